"""The host policy's path rule on a real filesystem: what ``adapters.paths`` observes and what it lets the
executor open right before it acts (a symlink swapped after the plan is caught here)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from reconciler.adapters.paths import observe_path, require
from reconciler.apply.executor import Executor
from reconciler.errors import Refused
from reconciler.plan import steps as s
from reconciler.spec.host import HostConfig
from reconciler.spec.models import VirtualMachine
from reconciler.state import files
from reconciler.state.layout import StateLayout


@pytest.fixture
def root(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    (images / "base.img").write_bytes(b"\0" * 512)
    return images


def test_observe_path_follows_symlinks_and_tells_the_kind(root: Path) -> None:
    (root / "link").symlink_to(root / "base.img")
    (root / "zero").symlink_to("/dev/zero")
    assert observe_path(str(root / "link")).resolved == str(root / "base.img")
    assert observe_path(str(root / "link")).kind == "file"
    assert observe_path(str(root / "zero")).kind == "device"
    assert observe_path(str(root)).kind == "directory"
    assert observe_path(str(root / "nothing")).kind == "missing"


def test_require_returns_the_resolved_path_and_refuses_a_swapped_symlink(tmp_path: Path, root: Path) -> None:
    host = HostConfig(storageRoots=[str(root)])
    link = root / "current.img"
    link.symlink_to(root / "base.img")
    assert require("spec.disks[d].image", str(link), host, str(tmp_path / "state")) == str(root / "base.img")
    link.unlink()
    link.symlink_to("/etc/passwd")  # swapped between plan and apply
    with pytest.raises(Refused, match=r"spec.disks\[d\].image: .*current.img resolves to /etc/passwd, outside"):
        require("spec.disks[d].image", str(link), host, str(tmp_path / "state"))


def test_require_refuses_the_state_directory_even_inside_a_root(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "disks" / "db").mkdir(parents=True)
    (state / "disks" / "db" / "root.qcow2").write_bytes(b"")
    (state / "infinization.db").write_bytes(b"")
    host = HostConfig(storageRoots=[str(tmp_path)])
    for victim in (state / "disks" / "db" / "root.qcow2", state / "infinization.db"):
        with pytest.raises(Refused, match="in the state directory"):
            require("spec.cdroms[c].image", str(victim), host, str(state))


def test_executor_creates_a_linked_clone_from_the_resolved_image_only_while_allowed(tmp_path: Path,
                                                                                   root: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    executor = Executor(layout, host=HostConfig(storageRoots=[str(root)]))
    link = root / "base-link.img"
    link.symlink_to("/etc/passwd")
    disk = layout.vm("web").disk("data")
    step = s.CreateDisk(name="web", target="data", summary="", path=str(disk), size=None, image=str(link),
                        image_format="raw")
    with pytest.raises(Refused, match="outside the storage roots"):
        asyncio.run(executor._vm_step(step))
    assert not disk.exists()
    assert not os.path.exists(layout.vm("web").dir / "record.json")


@pytest.mark.skipif(not Path("/usr/bin/qemu-img").exists(), reason="needs qemu-img")
def test_a_linked_clone_is_backed_by_the_resolved_path(tmp_path: Path, root: Path) -> None:
    from reconciler.adapters.qemu_img import inspect_image

    layout = StateLayout(tmp_path / "state")
    executor = Executor(layout, host=HostConfig(storageRoots=[str(root)]))
    (root / "current.img").symlink_to(root / "base.img")
    vm = VirtualMachine.model_validate({"apiVersion": "infinization.io/v1alpha1", "kind": "VirtualMachine",
                                        "metadata": {"name": "web"}, "spec": {}})
    files.write_record(layout.vm("web"), vm, None, None)  # the executor claims disks in the VM's record
    disk = layout.vm("web").disk("data")
    step = s.CreateDisk(name="web", target="data", summary="", path=str(disk), size=None,
                        image=str(root / "current.img"), image_format="raw")
    asyncio.run(executor._vm_step(step))
    assert inspect_image(disk).backing == str(root / "base.img")
