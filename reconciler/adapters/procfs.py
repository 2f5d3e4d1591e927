"""Find a VM's QEMU process and prove it is ours before anyone trusts or signals its PID.

A PID from a pidfile can be stale or recycled, and QEMU's user writes the pidfile, so a process is this
VM's QEMU only when everything we recorded when we launched it (``launch.json``, root's) matches /proc:
its pid and start time, its real and effective uid, ``/proc/PID/exe`` (the configured QEMU binary, not
deleted), its argv, and the pidfile naming it. A live process that fails this is *not adopted*: the VM
is observed as not running, and ``examine`` says why (``Examined.unverified``). A start interrupted between
the launch and its record leaves launch.json without a pid: the process the pidfile names is then adopted
when it started after the record was written (``not_before``) and matches all the rest (``Examined.recorded``
is False until the executor records it). Liveness reads
/proc/PID/stat, because an exited QEMU (not our child) stays a zombie of PID 1 for a while and
``kill -0`` would still succeed. Used by the snapshot builder, the executor (which re-checks before every
signal) and the sync daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from reconciler.state.files import launched_pid_if_no_pidfile, read_launch, read_pidfile, read_tpm_launch
from reconciler.state.layout import VMPaths
from reconciler.state.models import LaunchRecord, TpmLaunchRecord

Record = TypeVar("Record", LaunchRecord, TpmLaunchRecord)


@dataclass(frozen=True)
class QemuProcess:
    pid: int
    start_time: int
    cmdline: tuple[str, ...]


@dataclass(frozen=True)
class Examined:
    """What a VM's pidfile leads to: our verified QEMU, or why the live process it names is not adopted."""

    process: QemuProcess | None = None
    unverified: str | None = None
    pid: int | None = None  # the live process the pidfile names, verified or not
    launch: LaunchRecord | None = None  # launch.json as read for the check (the snapshot reuses it)
    recorded: bool = True  # False: adopted from a launch.json that does not name its pid yet


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


async def wait_dead(pid: int, timeout: float, poll: float = 0.02) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to be gone (or a zombie); True if it is."""
    deadline = time.monotonic() + timeout
    while is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll)
    return True


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of stat: starttime in clock ticks


def read_cmdline(pid: int) -> tuple[str, ...] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return tuple(os.fsdecode(part) for part in raw.split(b"\0")[:-1]) if raw else None


def uids(pid: int) -> tuple[int, ...] | None:
    """Real, effective, saved and filesystem uid of ``pid``."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return tuple(int(part) for part in line.split()[1:])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


LAUNCH_WINDOW = 15.0  # seconds after its record within which a launch forks (the launcher's timeout is 10 s)


def completed(pid: int, launch: Record) -> Record:
    """``launch`` as if it named ``pid``, when it names no pid yet and ``pid`` was forked in the launch's window:
    after the record was written (the launch waits for the next tick, ``files.wait_next_tick``) and within
    ``LAUNCH_WINDOW`` of it. That is a start interrupted between the launch and its record (a kill -9, a power
    cut); ``mismatch`` then checks all the rest (uid, executable, argv). Anything else: ``launch`` as is."""
    if launch.pid is not None or launch.not_before is None:
        return launch
    began = start_time(pid)
    window = int(LAUNCH_WINDOW * os.sysconf("SC_CLK_TCK"))
    if began is None or not launch.not_before < began <= launch.not_before + window:
        return launch
    return launch.model_copy(update={"pid": pid, "start_time": began})


def launched_from(launch: LaunchRecord) -> bool:
    """Whether a live process of the record's user runs its argv and was forked in its launch's window (a
    scan of /proc: only while a start waits for an interrupted launch's QEMU to write its pidfile)."""
    with os.scandir("/proc") as entries:
        pids = [int(entry.name) for entry in entries if entry.name.isdigit()]
    for pid in pids:
        if read_cmdline(pid) == tuple(launch.argv) and completed(pid, launch).pid == pid and is_alive(pid) \
                and set(uids(pid) or ()) == {launch.uid}:
            return True
    return False


def mismatch(pid: int, launch: LaunchRecord | TpmLaunchRecord | None) -> str | None:
    """Why live process ``pid`` is not the process ``launch`` records (None: it is)."""
    if launch is None or launch.pid is None or launch.start_time is None:
        if launch is not None and launch.not_before is not None:
            return "it was not started by the launch its record (launch.json) was written for"
        return "no launch record names it (launch.json is missing or was never completed)"
    if launch.pid != pid:
        return f"launch.json names pid {launch.pid}"
    if start_time(pid) != launch.start_time:
        return "its start time is not the one recorded at launch (a recycled pid)"
    found_uids = uids(pid)
    if launch.uid is None or found_uids is None or set(found_uids) != {launch.uid}:
        return f"it runs as uid {found_uids[0] if found_uids else '?'}, not QEMU's user ({launch.uid})"
    binary = exe(pid)
    if launch.binary is None or binary != os.path.realpath(launch.binary):
        return f"its executable is {binary!r}, not {launch.binary}"
    if read_cmdline(pid) != tuple(launch.argv):
        return "its command line is not the one we launched"
    return None


def examine(paths: VMPaths) -> Examined:
    """The VM's QEMU if the pidfile names a live process that passes every check (``mismatch``)."""
    pid = read_pidfile(paths.pidfile) or launched_pid_if_no_pidfile(paths)
    if pid is None or not is_alive(pid):
        return Examined()
    launch = read_launch(paths)
    named = completed(pid, launch) if launch is not None else None
    why = mismatch(pid, named)
    cmdline, began = read_cmdline(pid), start_time(pid)
    if why is None and (cmdline is None or began is None or not is_alive(pid)
                        or named is None or began != named.start_time or cmdline != tuple(named.argv)):
        why = "it exited while being checked"  # or its pid was reused meanwhile
    if why is not None or cmdline is None or began is None:
        return Examined(unverified=f"pid {pid} in {paths.pidfile} is not adopted: {why}", pid=pid, launch=launch)
    return Examined(QemuProcess(pid=pid, start_time=began, cmdline=cmdline), pid=pid, launch=launch,
                    recorded=launch is not None and launch.pid is not None)


def find_qemu(paths: VMPaths) -> QemuProcess | None:
    """The live, verified QEMU of this VM, or None (no pidfile, dead, zombie, or not proven ours)."""
    return examine(paths).process


def still_same(process: QemuProcess, paths: VMPaths) -> bool:
    """Re-check right before a signal: same PID, same start time, still our verified QEMU, still alive."""
    return examine(paths).process == process


DNSMASQ_USERS = ("nobody", "dnsmasq")  # the users dnsmasq drops to after binding (besides root)


def _dnsmasq_uids() -> set[int]:
    found = {0}
    for name in DNSMASQ_USERS:
        with contextlib.suppress(KeyError):
            found.add(pwd.getpwnam(name).pw_uid)
    return found


def find_swtpm(paths: VMPaths) -> QemuProcess | None:
    """The VM's live swtpm when its pidfile names a process that passes every check of ``mismatch``
    against ``swtpm.json``. A record without a pid (a crash between the launch and its record) is checked on
    what it has (``completed``): the pidfile, a start after the record, uid, executable and argv (which names
    this VM's TPM state and socket)."""
    pid = read_pidfile(paths.tpm_pidfile)
    launch = read_tpm_launch(paths)
    if pid is None or launch is None or not is_alive(pid):
        return None
    if launch.pid is None and launch.not_before is None:  # written before records had a clock: as it was
        launch = launch.model_copy(update={"pid": pid, "start_time": start_time(pid)})
    launch = completed(pid, launch)
    cmdline, began = read_cmdline(pid), start_time(pid)
    if mismatch(pid, launch) is not None or cmdline is None or began is None:
        return None
    return QemuProcess(pid=pid, start_time=began, cmdline=cmdline)


def find_dnsmasq(pidfile: Path) -> int | None:
    """The live dnsmasq that owns ``pidfile``, or None. Like QEMU's, its PID is only trusted when /proc proves
    it: the real dnsmasq binary (not deleted), running as root or the user dnsmasq drops to, whose argv names
    this pidfile. A recycled PID whose process merely forges that argv (any unprivileged user can) is not."""
    pid = read_pidfile(pidfile)
    if pid is None or not is_alive(pid):
        return None
    if f"--pid-file={pidfile}" not in (read_cmdline(pid) or ()):
        return None
    binary = shutil.which("dnsmasq", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if binary is None or exe(pid) != os.path.realpath(binary):
        return None
    found = uids(pid)
    return pid if found is not None and set(found) <= _dnsmasq_uids() else None


_LISTEN = "0A"


def listening_ports() -> set[int]:
    """TCP ports with a socket in LISTEN state on any address (/proc/net/tcp and tcp6)."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                lines = handle.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == _LISTEN:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
