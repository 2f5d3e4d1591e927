"""A private hugetlbfs for QEMU's memory on hugepages, mounted by the executor when a VM needs it.

Called by ``apply.vmprocess`` before it starts a VM with ``memory.hugepages``. QEMU runs unprivileged and
its ``memory-backend-file`` creates (and at once unlinks) a file in ``mem-path``, so the directory must be
QEMU's user's: the host's shared ``/dev/hugepages`` is root's. We mount one hugetlbfs per page size at
``HostConfig.hugepagesDir``/``2M`` or ``1G`` (``uid``/``gid`` of QEMU's user, mode 0700), once; it stays
mounted (VMs share it; it holds no files while no QEMU uses it) and costs nothing: pages come from the
host's pool (``/proc/sys/vm/nr_hugepages``), which the plan checked.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from reconciler.errors import StepFailed

MOUNTS = Path("/proc/mounts")


def _mounted(path: str) -> dict[str, str] | None:
    """The mount options of the filesystem mounted at ``path`` (the last one), with its type under 'type'."""
    found = None
    for line in MOUNTS.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[1] == path:
            found = {"type": fields[2], **dict(opt.partition("=")[::2] for opt in fields[3].split(","))}
    return found


def ensure(path: str, pagesize: str, uid: int, gid: int) -> str:
    """Mount a hugetlbfs of ``pagesize`` (``2M``, ``1G``) at ``path`` for ``uid``:``gid`` unless it is there."""
    have = _mounted(path)
    if have is not None:
        if have["type"] != "hugetlbfs" or have.get("pagesize", "2M") != pagesize:
            raise StepFailed(f"{path} is a {have['type']} mount (pagesize {have.get('pagesize', '-')}), not the "
                             f"hugetlbfs of {pagesize} pages infinization needs there")
        return path
    Path(path).mkdir(mode=0o755, parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "hugetlbfs", "-o", f"pagesize={pagesize},uid={uid},gid={gid},mode=0700",
                           "infinization-hugepages", path], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise StepFailed(f"cannot mount a hugetlbfs at {path}: {done.stderr.strip() or done.returncode}")
    return path
