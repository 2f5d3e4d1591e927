"""A VM's disk images as the planner sees them (``ObservedImage``): from QEMU when it has them open, else
from ``qemu-img info -U``.

Called by the snapshot builder for each VM. A running QEMU already knows each disk's format node: its
virtual size, format and backing file, in one ``query-named-block-nodes`` answer over the monitor session
the snapshot opens anyway. Asking QEMU costs about a millisecond for all the VM's disks, where a
``qemu-img info`` process costs tens of milliseconds per disk (and more on a loaded host). Disks QEMU does
not have open (a stopped VM, a disk not plugged yet) are read with ``qemu-img`` in a worker thread, so
several VMs are observed at once.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from reconciler.adapters import qemu_img, threads
from reconciler.plan.observed import ObservedImage
from reconciler.spec.naming import disk_node


def image_from_node(path: Path, node: dict[str, Any]) -> ObservedImage | None:
    """The image of a format node from ``query-named-block-nodes`` (pure), or None when the answer lacks
    what ``qemu-img info`` would give. The backing file is the one the image's header names, resolved
    against the image's directory as ``qemu-img`` does (QEMU's own ``full-backing-filename`` is relative to
    the fd set it opened the image through, not to the file)."""
    image = node.get("image")
    if not isinstance(image, dict) or "virtual-size" not in image:
        return None
    backing = image.get("backing-filename")
    if backing and not os.path.isabs(backing):
        backing = os.path.normpath(os.path.join(path.parent, backing))
    return ObservedImage(path=str(path), exists=True, virtual_size=int(image["virtual-size"]),
                         format=node.get("drv") or image.get("format"), backing=backing or None,
                         backing_format=image.get("backing-filename-format") if backing else None)


def from_nodes(disk_paths: dict[str, Path], nodes: list[dict[str, Any]]) -> dict[str, ObservedImage]:
    """The disks QEMU has open as format nodes ``disk-NAME`` (pure); others are left out."""
    by_name = {node.get("node-name"): node for node in nodes}
    found = {}
    for disk, path in disk_paths.items():
        node = by_name.get(disk_node(disk))
        if node is not None and (image := image_from_node(path, node)) is not None:
            found[disk] = image
    return found


async def observe_disks(disk_paths: dict[str, Path], nodes: list[dict[str, Any]] | None) -> dict[str, ObservedImage]:
    """Each disk's image: QEMU's answer (``nodes``) where it has the disk open and the file is still there,
    ``qemu-img info -U`` (in worker threads, side by side) for the rest."""
    known = {disk: image for disk, image in from_nodes(disk_paths, nodes or []).items() if disk_paths[disk].exists()}
    rest = sorted(set(disk_paths) - set(known))
    read = await asyncio.gather(*(threads.run(qemu_img.inspect_image, disk_paths[disk]) for disk in rest))
    return {disk: (known[disk] if disk in known else read[rest.index(disk)]) for disk in sorted(disk_paths)}


async def inspect_all(paths: Iterable[str]) -> dict[str, ObservedImage]:
    """Backing images (never opened by us read-write): ``qemu-img info -U`` for each, side by side."""
    unique = sorted(set(paths))
    read = await asyncio.gather(*(threads.run(qemu_img.inspect_image, path) for path in unique))
    return dict(zip(unique, read, strict=True))
