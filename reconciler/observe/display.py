"""Observe what the displays depend on: each VM's recorded port and the password set on its QEMU
(``display.json``), a keyed hash of each desired passwordFile, and which display ports the host's sockets
already listen on. Read-only; called by ``observe.snapshot.observe``. The password itself never leaves
``adapters.secrets``: only its HMAC under the host's ``display.key`` is in the observed state.
"""

from __future__ import annotations

from collections.abc import Mapping

from reconciler.adapters import procfs, secrets
from reconciler.errors import Refused
from reconciler.plan.observed import ObservedSecret, ObservedVM
from reconciler.spec.host import HostConfig
from reconciler.spec.models import VirtualMachine
from reconciler.state import files
from reconciler.state.layout import StateLayout


def observe_secret(layout: StateLayout, vm: VirtualMachine, host: HostConfig) -> ObservedSecret | None:
    display = vm.spec.display
    if not display.enabled or display.passwordFile is None:
        return None
    path = display.passwordFile
    try:
        password = secrets.read_password(path, host, str(layout.root))
    except Refused as exc:
        return ObservedSecret(path=path, problem=str(exc).removeprefix("host policy: "))
    key = files.read_display_key(layout)
    digest = secrets.keyed_digest(key, vm.name, password, display.passwordExpiresAfter) if key else ""
    return ObservedSecret(path=path, digest=digest, length=len(password))


def with_display(layout: StateLayout, observed: ObservedVM, desired: VirtualMachine | None,
                 host: HostConfig) -> ObservedVM:
    """The VM's observation with the password set on its running QEMU and its passwordFile's hash."""
    record = files.read_display(layout.vm(observed.name))
    process = observed.process
    password = record.password
    current = password is not None and process is not None and (password.pid, password.start_time) == (
        process.pid, process.start_time)
    return observed.model_copy(update={
        "display_password": password.digest if current and password else None,
        "secret": observe_secret(layout, desired, host) if desired is not None else None,
    })


def listening(desired: Mapping[str, VirtualMachine], host: HostConfig) -> list[int]:
    """Ports in the display range, or fixed display ports wanted, that a socket on the host listens on
    (only those: other ports coming and going must not make a saved plan stale)."""
    low, high = host.display_port_range
    wanted = {vm.spec.display.port for vm in desired.values() if isinstance(vm.spec.display.port, int)}
    return sorted(port for port in procfs.listening_ports() if low <= port <= high or port in wanted)
