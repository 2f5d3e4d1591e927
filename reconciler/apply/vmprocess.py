"""Start and stop QEMU procfs.

Start: write the launch record, run the argv from the pure builder (no shell) with ``-daemonize`` (QEMU
forks and its first process exits only once its monitors listen, so a start error is reported
synchronously with QEMU's own message), then wait for the monitor to say the guest runs.
Stop: ``system_powerdown`` and wait up to the grace period, then ``quit``, then SIGKILL, each only to the
PID we verified (and re-verify right before signalling) as this VM's QEMU.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

from reconciler.adapters import monitor, procfs
from reconciler.apply import hostnet
from reconciler.errors import MonitorError, StepFailed
from reconciler.qemu.argv import build_argv
from reconciler.spec.models import VirtualMachine, nic_mac, tap_name
from reconciler.state import files
from reconciler.state.layout import VMPaths
from reconciler.state.models import STOPPED, ExitRecord

QUIT_TIMEOUT = 5.0
READY_TIMEOUT = 30.0
POLL = 0.05
REPRESS = 2.0


async def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while procfs.is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL)
    return True


async def start(paths: VMPaths, vm: VirtualMachine, bridges: dict[str, str], vhost: bool = False) -> str:
    """Start the VM unless its QEMU already runs; return what was done.

    ``bridges`` maps each bridged NIC to its bridge: their TAPs are created here and handed to QEMU as
    file descriptors (closed on our side once QEMU has them).
    """
    if procfs.find_qemu(paths.pidfile) is not None:
        return "already running"
    paths.dir.mkdir(parents=True, exist_ok=True)
    taps: dict[str, list[int]] = {}
    try:
        for nic in vm.spec.networks:
            if nic.type == "bridge":
                taps[nic.name] = await asyncio.to_thread(
                    hostnet.open_tap, tap_name(vm.name, nic.name), bridges[nic.name], nic.queues, nic_mac(vm.name, nic))
        argv = build_argv(vm.name, vm.spec, paths, taps=taps, vhost=vhost)
        files.write_launch(paths, argv, vm)
        try:
            done = await asyncio.to_thread(
                subprocess.run, argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=READY_TIMEOUT, check=False, start_new_session=True,
                pass_fds=[fd for fds in taps.values() for fd in fds],
            )
        except FileNotFoundError as exc:
            raise StepFailed(f"cannot run {argv[0]}: is QEMU installed?") from exc
        except subprocess.TimeoutExpired as exc:
            raise StepFailed(f"QEMU did not finish starting within {READY_TIMEOUT:g}s") from exc
    finally:
        hostnet.close_all([fd for fds in taps.values() for fd in fds])
    if done.returncode != 0:
        message = done.stderr.strip() or f"exit status {done.returncode}"
        raise StepFailed(f"QEMU refused to start: {message}")
    process = procfs.find_qemu(paths.pidfile)
    if process is None:
        raise StepFailed("QEMU exited right after starting (see `infinization logs`)")
    files.clear_exit(paths)  # a new run: how the previous one ended no longer matters
    await _wait_running(paths.qmp, process.pid)
    return f"started, pid {process.pid}"


async def _wait_running(socket: Path, pid: int) -> None:
    """Wait for the guest to run; fail at once if its QEMU dies meanwhile (killed, or crashed while
    loading), rather than knocking on a dead monitor's socket until the deadline."""
    deadline = time.monotonic() + READY_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if not procfs.is_alive(pid):
            raise StepFailed(f"QEMU pid {pid} exited before its guest ran (see `infinization logs`)")
        try:
            async with monitor.session(socket) as qmp:
                status = (await qmp.execute("query-status")).get("status", "")
            if status == "running":
                return
            last = f"status {status}"
        except MonitorError as exc:
            last = str(exc)
        await asyncio.sleep(POLL)
    raise StepFailed(f"the VM did not reach 'running' within {READY_TIMEOUT:g}s ({last})")


async def _press_power_button(paths: VMPaths, pid: int, grace: float) -> bool:
    """Press the ACPI power button until the guest powers off or ``grace`` runs out.

    The press is repeated every ``REPRESS`` seconds because a guest that is still booting has no ACPI
    handler yet and would lose a single press; a guest already shutting down ignores the extra ones.
    """
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            async with monitor.session(paths.qmp) as qmp:
                await qmp.execute("system_powerdown")
        except MonitorError:
            return await _wait_dead(pid, 0)
        if await _wait_dead(pid, min(REPRESS, max(0.0, deadline - time.monotonic()))):
            return True
    return False


async def stop(paths: VMPaths, grace: float) -> str:
    """Stop the VM's QEMU if it runs: ACPI power button, then quit, then SIGKILL; return what worked."""
    process = procfs.find_qemu(paths.pidfile)
    if process is None:
        return "not running"
    how = await _stop(paths, process, grace)
    # The guest saw a power button and shut down cleanly, but it was our doing: RerunOnFailure must start
    # it again when asked to, as it would not after a shutdown the guest chose.
    files.write_exit(paths, ExitRecord(reason=STOPPED, how=how))
    return how


async def _stop(paths: VMPaths, process: procfs.QemuProcess, grace: float) -> str:
    if grace > 0 and await _press_power_button(paths, process.pid, grace):
        return "guest powered off"
    try:
        async with monitor.session(paths.qmp) as qmp:
            await qmp.execute("quit")
    except MonitorError:
        pass
    if await _wait_dead(process.pid, QUIT_TIMEOUT):
        return f"quit after the guest ignored the power button for {grace:g}s" if grace else "quit"
    if procfs.still_same(process, paths.pidfile):
        os.kill(process.pid, signal.SIGKILL)
    if await _wait_dead(process.pid, QUIT_TIMEOUT):
        return "killed (SIGKILL) after quit did not work"
    raise StepFailed(f"QEMU pid {process.pid} is still alive after SIGKILL")
