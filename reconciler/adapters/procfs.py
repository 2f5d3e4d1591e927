"""Find a VM's QEMU process and prove it is ours before anyone trusts or signals its PID.

A PID from a pidfile can be stale or recycled, so a process is accepted only when /proc/PID/cmdline is a
``qemu-system-*`` whose ``-pidfile`` argument is this VM's pidfile. Liveness reads /proc/PID/stat, because a
daemonized QEMU that exited stays a zombie of PID 1 for a while and ``kill -0`` would still succeed.
Used by the snapshot builder and by the executor (which re-checks before every signal).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from reconciler.state.files import read_pidfile


@dataclass(frozen=True)
class QemuProcess:
    pid: int
    start_time: int
    cmdline: tuple[str, ...]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces or ')': split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def is_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie or dead."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X", "x")


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of stat: starttime in clock ticks


def read_cmdline(pid: int) -> tuple[str, ...] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return tuple(os.fsdecode(part) for part in raw.split(b"\0")[:-1]) if raw else None


def is_our_qemu(cmdline: tuple[str, ...], pidfile: Path) -> bool:
    if not cmdline or not os.path.basename(cmdline[0]).startswith("qemu-system-"):
        return False
    return any(arg == "-pidfile" and cmdline[i + 1] == str(pidfile) for i, arg in enumerate(cmdline[:-1]))


def find_qemu(pidfile: Path) -> QemuProcess | None:
    """The live QEMU that owns ``pidfile``, or None (no pidfile, dead, zombie, or someone else's PID)."""
    pid = read_pidfile(pidfile)
    if pid is None or not is_alive(pid):
        return None
    cmdline = read_cmdline(pid)
    began = start_time(pid)
    if cmdline is None or began is None or not is_our_qemu(cmdline, pidfile):
        return None
    return QemuProcess(pid=pid, start_time=began, cmdline=cmdline)


def still_same(process: QemuProcess, pidfile: Path) -> bool:
    """Re-check right before a signal: same PID, same start time, still our QEMU, still alive."""
    return (
        is_alive(process.pid)
        and start_time(process.pid) == process.start_time
        and read_cmdline(process.pid) == process.cmdline
        and is_our_qemu(process.cmdline, pidfile)
    )


def find_dnsmasq(pidfile: Path) -> int | None:
    """The live dnsmasq that owns ``pidfile`` (its /proc cmdline names it), or None."""
    pid = read_pidfile(pidfile)
    if pid is None or not is_alive(pid):
        return None
    return pid if f"--pid-file={pidfile}" in (read_cmdline(pid) or ()) else None
