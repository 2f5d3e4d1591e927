"""observe.images: a running VM's disk images from QEMU's block nodes, as ``qemu-img info`` would give them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from reconciler.observe import images
from reconciler.plan.observed import ObservedImage

# Trimmed from QEMU 7.2's ``query-named-block-nodes {"flat": true}``: a linked clone's format node (its
# backing an explicit node, the image opened through an fd set), its protocol node, and a plain disk.
NODES = [
    {"node-name": "disk-root", "drv": "qcow2", "file": "/dev/fdset/1",
     "image": {"filename": "/dev/fdset/1", "format": "qcow2", "virtual-size": 67108864,
               "backing-filename": "../images/base.qcow2", "full-backing-filename": "/dev/images/base.qcow2",
               "backing-filename-format": "qcow2"}},
    {"node-name": "file-root", "drv": "file", "file": "/dev/fdset/1",
     "image": {"filename": "/dev/fdset/1", "format": "file", "virtual-size": 200704}},
    {"node-name": "disk-data", "drv": "qcow2", "file": "/dev/fdset/3",
     "image": {"filename": "/dev/fdset/3", "format": "qcow2", "virtual-size": 33554432}},
]


def test_format_nodes_give_size_format_and_backing_resolved_against_the_file() -> None:
    found = images.from_nodes({"root": Path("/st/vms/a/disks/root.qcow2"), "data": Path("/st/vms/a/disks/data.qcow2"),
                               "new": Path("/st/vms/a/disks/new.qcow2")}, NODES)
    assert found == {
        "root": ObservedImage(path="/st/vms/a/disks/root.qcow2", exists=True, virtual_size=64 * 1024**2,
                              format="qcow2", backing="/st/vms/a/images/base.qcow2", backing_format="qcow2"),
        "data": ObservedImage(path="/st/vms/a/disks/data.qcow2", exists=True, virtual_size=32 * 1024**2,
                              format="qcow2"),
    }  # "new" is not open in QEMU: left to qemu-img


def test_a_disk_qemu_does_not_have_is_read_from_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "gone.qcow2"
    found = asyncio.run(images.observe_disks({"data": missing}, NODES))
    # QEMU's answer names disk-data, but the file is gone: what is on disk wins.
    assert found == {"data": ObservedImage(path=str(missing), exists=False)}
