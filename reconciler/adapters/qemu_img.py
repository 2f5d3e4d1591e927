"""Read disk images with ``qemu-img info -U --output=json`` (force-share: safe on a running VM's disk)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from reconciler.adapters import qcow2
from reconciler.plan.observed import ObservedImage

QEMU_IMG = "qemu-img"


def inspect_image(path: Path | str) -> ObservedImage:
    path = Path(path)
    if not path.exists():
        return ObservedImage(path=str(path), exists=False)
    if (header := qcow2.read_header(path)) is not None:  # the plain qcow2 case, without a process
        return ObservedImage(path=str(path), exists=True, virtual_size=header.virtual_size, format="qcow2",
                             backing=header.backing, backing_format=header.backing_format)
    try:
        done = subprocess.run(
            [QEMU_IMG, "info", "-U", "--output=json", str(path)],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return ObservedImage(path=str(path), exists=True, error=str(exc))
    if done.returncode != 0:
        return ObservedImage(path=str(path), exists=True, error=done.stderr.strip() or "qemu-img info failed")
    info = json.loads(done.stdout)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing and not os.path.isabs(backing):
        backing = os.path.normpath(os.path.join(path.parent, backing))
    return ObservedImage(
        path=str(path), exists=True, virtual_size=int(info["virtual-size"]), format=info.get("format"),
        backing=backing, backing_format=info.get("backing-filename-format"),
    )
