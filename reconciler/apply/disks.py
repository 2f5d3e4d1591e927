"""Create, grow and delete qcow2 disk files with qemu-img (and ``block_resize`` for a running VM).

Growth only: every function re-reads the image and refuses to make it smaller, whatever the plan said.
A new image is built under a temporary name and linked into place, so a crash never leaves a
half-written disk under the real name and an existing file is never overwritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from pathlib import Path

from reconciler.adapters import monitor
from reconciler.adapters.qemu_img import QEMU_IMG, inspect_image
from reconciler.errors import StepFailed
from reconciler.spec.units import format_size


def _run(argv: list[str]) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StepFailed(f"{' '.join(argv[:2])}: {exc}") from exc
    if done.returncode != 0:
        raise StepFailed(f"{' '.join(argv[:2])} failed: {done.stderr.strip()}")


def create(path: Path, size: int | None, image: str | None, image_format: str) -> str:
    if path.exists():
        return "already exists (kept as it is)"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()  # left by an interrupted earlier create
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
    if image:
        argv += ["-b", image, "-F", image_format]
    argv.append(str(partial))
    if size is not None:
        argv.append(str(size))
    _run(argv)
    try:
        os.link(partial, path)  # fails if the real name appeared meanwhile: never overwrite
    except FileExistsError:
        return "already exists (kept as it is)"
    finally:
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


async def grow_live(qmp_socket: Path, node: str, path: Path, size: int) -> str:
    current = await asyncio.to_thread(_current_size, path)
    if current >= size:
        return "already that size" if current == size else f"refused: it is {format_size(current)}, larger"
    async with monitor.session(qmp_socket) as qmp:
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
