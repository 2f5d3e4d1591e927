"""Stop a VM's swtpm (the TPM emulator QEMU's tpm-crb talks to), only once /proc proves it is ours.

It is started by ``apply.vmprocess`` right before QEMU, through the same confined launcher (QEMU's user,
no capabilities, NoNewPrivs), and exits by itself when QEMU's connection drops (``--terminate``). What is
left here is for when it does not: a swtpm whose QEMU never started (a failed start, a kill -9 between
the two launches) is stopped by the next start or by a planned ``stop-tpm`` step. SIGTERM first, then
SIGKILL, each through a pidfd opened before the last identity check (``procfs.find_swtpm``).
"""

from __future__ import annotations

import contextlib
import os
import signal

from reconciler.adapters import procfs
from reconciler.errors import StepFailed
from reconciler.state.layout import VMPaths

TERM_TIMEOUT = 5.0
POLL = 0.02


def _signal(process: procfs.QemuProcess, paths: VMPaths, signum: signal.Signals) -> None:
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return
    try:
        if procfs.find_swtpm(paths) == process:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signum)
    finally:
        os.close(pidfd)


async def stop(paths: VMPaths) -> str:
    """Stop the VM's verified swtpm if one runs; what was done ("" when none runs)."""
    process = procfs.find_swtpm(paths)
    if process is None:
        return ""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        _signal(process, paths, signum)
        if await procfs.wait_dead(process.pid, TERM_TIMEOUT):
            return f"swtpm pid {process.pid} stopped ({signum.name})"
    raise StepFailed(f"swtpm pid {process.pid} is still alive after SIGKILL")
