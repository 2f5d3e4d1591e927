"""Create, grow and delete qcow2 disk files with qemu-img (and ``block_resize`` for a running VM).

Growth only: every function re-reads the image and refuses to make it smaller, whatever the plan said.
A new image is built under a temporary name and linked into place, so a crash never leaves a
half-written disk under the real name and an existing file is never overwritten. Disks belong to QEMU's
user, 0600 (given at creation, and again before QEMU opens them); QEMU receives them as file
descriptors (``open_for_qemu``, ``open_read_only``), so it needs no access to their directories.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from pathlib import Path

from reconciler.adapters import monitor, threads
from reconciler.adapters.qemu_img import QEMU_IMG, inspect_image
from reconciler.errors import StepFailed
from reconciler.spec.units import format_size
from reconciler.state import files


def _run(argv: list[str]) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StepFailed(f"{' '.join(argv[:2])}: {exc}") from exc
    if done.returncode != 0:
        raise StepFailed(f"{' '.join(argv[:2])} failed: {done.stderr.strip()}")


def give_to_qemu(path: Path, uid: int, gid: int) -> None:
    """Make the disk QEMU's user's, 0600 (a link is refused: it is not a disk we created)."""
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise StepFailed(f"{path} is not a regular file")
    if (info.st_uid, info.st_gid) != (uid, gid):
        os.chown(path, uid, gid, follow_symlinks=False)
    if stat.S_IMODE(info.st_mode) != 0o600:
        os.chmod(path, 0o600)


def open_for_qemu(path: Path, uid: int, gid: int, read_only: bool = False) -> int:
    """The disk, given to QEMU's user, opened read-write for QEMU (an fd it inherits or receives); a
    ``readOnly`` disk read-only (QEMU picks an fd of its fd set by access mode)."""
    try:
        give_to_qemu(path, uid, gid)
        return os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StepFailed(f"cannot open disk {path}: {exc.strerror or exc}") from exc


def open_read_only(path: str) -> int:
    """A file QEMU may only read (a backing image, a CD-ROM medium), opened for it by us."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StepFailed(f"cannot open {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StepFailed(f"{path} is not a regular file")
    return fd


def create(path: Path, size: int | None, image: str | None, image_format: str,
           owner: tuple[int, int] | None = None, preallocation: str = "off") -> str:
    """Create the qcow2 (a linked clone of ``image`` if given), owned by ``owner`` (QEMU's uid, gid), 0600,
    with ``preallocation`` (off, metadata, falloc, full: validated by the spec model)."""
    if path.exists():
        return "already exists (kept as it is)"
    files.make_private_dirs(path.parent)
    partial = path.with_name(f".{path.name}.partial")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()  # left by an interrupted earlier create
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
    if image:
        argv += ["-b", image, "-F", image_format]
    if preallocation != "off":
        argv += ["-o", f"preallocation={preallocation}"]
    argv.append(str(partial))
    if size is not None:
        argv.append(str(size))
    try:
        _run(argv)
        os.chmod(partial, 0o600)
        if owner is not None:
            os.chown(partial, *owner)
        os.link(partial, path)  # fails if the real name appeared meanwhile: never overwrite
    except FileExistsError:
        return "already exists (kept as it is)"
    except OSError as exc:  # e.g. a full file system: nothing half-written stays under either name
        raise StepFailed(f"cannot create {path}: {exc.strerror or exc}") from exc
    finally:  # whatever happened (qemu-img failed half-way, ENOSPC...), the temporary image goes
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return "created"


def _current_size(path: Path) -> int:
    image = inspect_image(path)
    if not image.exists or image.virtual_size is None:
        raise StepFailed(f"cannot read {path}: {image.error or 'missing'}")
    return image.virtual_size


def grow_offline(path: Path, size: int) -> str:
    current = _current_size(path)
    if current >= size:
        return "already that size" if current == size else f"refused: it is {format_size(current)}, larger"
    _run([QEMU_IMG, "resize", "-q", "-f", "qcow2", str(path), str(size)])
    return f"{format_size(current)} -> {format_size(size)}"


def live_size(nodes: object, node: str) -> int | None:
    """The virtual size of block node ``node`` in ``query-named-block-nodes``'s answer, None if not there."""
    for found in nodes if isinstance(nodes, list) else []:
        if isinstance(found, dict) and found.get("node-name") == node:
            size = (found.get("image") or {}).get("virtual-size")
            return int(size) if isinstance(size, int) else None
    return None


async def grow_live(qmp_socket: Path, node: str, path: Path, size: int) -> str:
    """Grow a running VM's disk with ``block_resize``, after reading its size from the QEMU that has it open
    (in the same session: no qemu-img process on the way of a live edit; qemu-img only if QEMU cannot say)."""
    async with monitor.session(qmp_socket) as qmp:
        current = live_size(await qmp.execute("query-named-block-nodes", {"flat": True}), node)
        if current is None:
            current = await threads.run(_current_size, path)
        if current >= size:
            return "already that size" if current == size else f"refused: it is {format_size(current)}, larger"
        await qmp.execute("block_resize", {"node-name": node, "size": size}, timeout=30)
    return f"{format_size(current)} -> {format_size(size)} live"


def delete(path: Path) -> str:
    try:
        path.unlink()
    except FileNotFoundError:
        return "already gone"
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only if empty
    return "deleted"
