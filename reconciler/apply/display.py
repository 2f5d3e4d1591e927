"""The executor's display work: the port a start uses (checked free first), and the password set over QMP.

Called by ``apply.executor`` for the ``record-display-port`` and ``set-display-password`` steps and around
every start. The password is read from its file right here (``adapters.secrets``: the host policy checked
again, the file's owner and mode too), sent to QEMU with ``set_password`` (then ``expire_password``), and
forgotten: only its keyed hash is recorded (``display.json``, for that QEMU's pid and start time), so the
next plan tells a changed file, or a new QEMU that has no password yet, from one that is set.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from reconciler.adapters import monitor, procfs, secrets
from reconciler.errors import MonitorError, StepFailed
from reconciler.spec.host import HostConfig
from reconciler.spec.models import DisplaySpec, VirtualMachine
from reconciler.state import files
from reconciler.state.layout import StateLayout, VMPaths


def check_free(listen: str, port: int) -> None:
    """Bind ``listen``:``port`` for a moment: another process that holds it makes the start fail here, with
    a clear error, rather than in QEMU. :raise StepFailed: When the port is taken."""
    family = socket.AF_INET6 if ipaddress.ip_address(listen).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as QEMU does: TIME_WAIT is no owner
        try:
            probe.bind((listen, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StepFailed(f"display port {port} on {listen} is in use by another process") from exc
            raise StepFailed(f"display: cannot listen on {listen}:{port}: {exc.strerror}") from exc


def as_started(paths: VMPaths, vm: VirtualMachine) -> VirtualMachine:
    """The VM with its display port resolved (the recorded one) and checked free. :raise StepFailed: When
    ``port: auto`` has no recorded port (the plan records it first) or the port is taken."""
    display = vm.spec.display
    if not display.enabled:
        return vm
    port = display.port if isinstance(display.port, int) else files.read_display(paths).port
    if port is None:
        raise StepFailed("display: port auto but no port recorded for the VM (re-plan)")
    check_free(display.listen, port)
    spec = vm.spec.model_copy(update={"display": display.model_copy(update={"port": port})})
    return vm.model_copy(update={"spec": spec})


async def set_password(layout: StateLayout, paths: VMPaths, host: HostConfig, name: str,
                       display: DisplaySpec) -> str:
    """Set the display's password on the VM's running QEMU, and record its keyed hash for that QEMU."""
    if display.type == "none" or display.passwordFile is None:
        return "no display password"
    process = procfs.find_qemu(paths)
    if process is None:
        raise StepFailed("the VM's QEMU is not running: its display password is set when it starts")
    password = secrets.read_password(display.passwordFile, host, str(layout.root))
    expiry = f"+{display.passwordExpiresAfter}" if display.passwordExpiresAfter else "never"
    try:
        async with monitor.session(paths.qmp) as qmp:
            await qmp.execute("set_password", {"protocol": display.type, "password": password})
            await qmp.execute("expire_password", {"protocol": display.type, "time": expiry})
    except MonitorError as exc:  # QMP's error names the command and the reason, never the arguments
        raise StepFailed(f"display password not set: {exc}") from exc
    digest = secrets.keyed_digest(files.display_key(layout), name, password, display.passwordExpiresAfter)
    files.record_display_password(paths, digest, process.pid, process.start_time)
    expires = "never expires" if expiry == "never" else f"expires in {display.passwordExpiresAfter}s"
    return f"display password set ({display.type}, {expires})"
