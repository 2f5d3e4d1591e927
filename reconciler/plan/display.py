"""Displays in the plan (pure): which port each VM's display gets, and whether its password must be set.

``assign_ports`` gives every desired VM with a display one port, the same for all of them in one plan:
a fixed ``port`` as written, ``port: auto`` the VM's recorded port while it stays usable, else the lowest
free one of the host's ``displayPortRange``. A port recorded for another VM, given to another VM in this
plan, or held by a socket that is not the VM's own QEMU is never given (a fixed one is refused, naming who
holds it). ``plan_display`` turns the choice and the observed password hash into steps (record the port,
set the password over QMP), restart causes (a password added or removed, a display that drifted) and
refusals (a passwordFile the host policy or its mode forbids, a VNC password longer than 8 characters).
Called by ``plan.planner``; the observer (``observe.display``) supplies the facts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.plan import steps as s
from reconciler.plan.actions import FieldChange, Mode
from reconciler.plan.observed import LiveDisplay, ObservedSecret, ObservedState, ObservedVM
from reconciler.spec.host import HostConfig
from reconciler.spec.models import VirtualMachine, VirtualMachineSpec

VNC_MAX_PASSWORD = 8  # RFB's VNC authentication DES-encrypts the challenge with an 8-byte key


def _busy(port: int, name: str, observed: ObservedState) -> bool:
    """A socket listens on ``port`` and it is not this VM's own running QEMU's display."""
    if port not in observed.listening:
        return False
    process = observed.vm(name).process
    live = process.live.display if process and process.live else None
    return not (live is not None and live.port == port)


@dataclass
class _Ports:
    """Ports handed out so far in one plan (port -> VM), and the answer per VM (a port or a refusal)."""

    low: int
    high: int
    taken: dict[int, str]
    result: dict[str, int | str] = field(default_factory=dict)

    def give(self, name: str, port: int) -> None:
        self.taken[port] = name
        self.result[name] = port


def _fixed(ports: _Ports, name: str, port: int, observed: ObservedState, host: HostConfig) -> None:
    if not ports.low <= port <= ports.high:
        ports.result[name] = f"spec.display.port: {port} is outside the host's displayPortRange {host.displayPortRange}"
    elif port in ports.taken:
        ports.result[name] = f"spec.display.port: {port} is already the display port of VM {ports.taken[port]}"
    elif _busy(port, name, observed):
        ports.result[name] = f"spec.display.port: {port} is in use by another process on this host"
    else:
        ports.give(name, port)


def _auto(ports: _Ports, name: str, observed: ObservedState, host: HostConfig) -> None:
    free = next((p for p in range(ports.low, ports.high + 1)
                 if p not in ports.taken and not _busy(p, name, observed)), None)
    if free is None:
        ports.result[name] = f"spec.display.port: auto: no free port left in displayPortRange {host.displayPortRange}"
    else:
        ports.give(name, free)


def assign_ports(desired: Mapping[str, VirtualMachine], observed: ObservedState,
                 host: HostConfig) -> dict[str, int | str]:
    """Each desired VM with a display -> its port, or why none can be given (a refusal)."""
    low, high = host.display_port_range
    wanted = {name: vm.spec.display.port for name, vm in sorted(desired.items()) if vm.spec.display.enabled}
    ports = _Ports(low, high, {port: name for name, port in observed.display_ports.items() if name not in wanted})
    # Ports already recorded for a VM that still wants them are kept first: stable across restarts.
    for name, port in wanted.items():
        mine = observed.display_ports.get(name)
        if mine is not None and port in ("auto", mine) and low <= mine <= high and mine not in ports.taken \
                and not _busy(mine, name, observed):
            ports.give(name, mine)
    for name, port in wanted.items():  # then new fixed ports, then new automatic ones
        if name not in ports.result and isinstance(port, int):
            _fixed(ports, name, port, observed, host)
    for name in wanted:
        if name not in ports.result:
            _auto(ports, name, observed, host)
    return ports.result


def with_port(spec: VirtualMachineSpec, port: int) -> VirtualMachineSpec:
    """The spec as QEMU gets it: ``port: auto`` resolved to the VM's port."""
    return spec.model_copy(update={"display": spec.display.model_copy(update={"port": port})})


@dataclass
class DisplayPlan:
    steps: list[s.Step] = field(default_factory=list)  # whether QEMU runs or not (the port's record)
    live: list[s.Step] = field(default_factory=list)  # on the running QEMU (the password)
    fields: list[FieldChange] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    restart_causes: list[str] = field(default_factory=list)


def plan_display(name: str, spec: VirtualMachineSpec, obs: ObservedVM, observed: ObservedState,
                 port: int | str | None) -> DisplayPlan:
    """``spec`` is the effective spec (its port resolved); ``port`` what ``assign_ports`` said."""
    out = DisplayPlan()
    if isinstance(port, str):
        out.refusals.append(port)
        return out
    if port is not None and observed.display_ports.get(name) != port:
        out.steps.append(s.RecordDisplayPort(name=name, target="display", port=port,
                                             summary=f"display: keep port {port} for this VM"))
    _password(out, name, spec, obs)
    launched = obs.process.launched if obs.process else None
    live = obs.process.live if obs.process else None
    if launched is not None and live is not None:
        _restart_causes(out, spec, launched, live.display)
    return out


def _password(out: DisplayPlan, name: str, spec: VirtualMachineSpec, obs: ObservedVM) -> None:
    display = spec.display
    if not display.enabled or display.passwordFile is None:
        return
    secret = obs.secret
    if (refusal := _secret_refusal(spec, secret)) is not None or secret is None:
        out.refusals.append(refusal or "spec.display.passwordFile: not read")
        return
    process = obs.process
    launched = process.launched if process else None
    started_locked = launched is not None and launched.display.passwordFile is not None \
        and launched.display.type == display.type
    if display.type == "none" or process is None or process.live is None or not started_locked \
            or obs.display_password == secret.digest:
        return  # a start sets it; a restart cause covers a display started without password auth
    rotated = obs.display_password is not None
    what = "display password rotated" if rotated else "display password not set on the running QEMU"
    out.reasons.append(what)
    out.live.append(s.SetDisplayPassword(name=name, target="display", protocol=display.type,
                                         path=display.passwordFile, expires_after=display.passwordExpiresAfter,
                                         summary=f"{what}: set_password ({display.type}) from "
                                         f"{display.passwordFile}" + (f", expire_password +{expiry}s" if (
                                             expiry := display.passwordExpiresAfter) else "")))
    out.fields.append(FieldChange(path="display.password", before="set" if rotated else "not set",
                                  after="rotated" if rotated else "set", mode=Mode.LIVE, how="set_password over QMP"))


def _secret_refusal(spec: VirtualMachineSpec, secret: ObservedSecret | None) -> str | None:
    display = spec.display
    if secret is None or secret.problem or secret.digest is None:
        return secret.problem if secret and secret.problem else \
            f"spec.display.passwordFile: {display.passwordFile} was not read"
    if display.type == "vnc" and (secret.length or 0) > VNC_MAX_PASSWORD:
        return (f"spec.display.passwordFile: {display.passwordFile} holds a password longer than "
                f"{VNC_MAX_PASSWORD} characters; VNC authentication uses only 8 (QEMU would cut it)")
    return None


def _restart_causes(out: DisplayPlan, spec: VirtualMachineSpec, launched: VirtualMachineSpec,
                    live: LiveDisplay | None) -> None:
    """A password added or removed (VNC/SPICE auth is chosen at start), and a display that is not where QEMU
    was started with it (changed over a monitor behind our back)."""
    want, had = spec.display, launched.display
    if want.type == had.type and want.enabled and (want.passwordFile is None) != (had.passwordFile is None):
        change = "added" if want.passwordFile else "removed"
        cause = f"display.passwordFile {change}: password authentication is chosen when QEMU starts"
        out.restart_causes.append(cause)
        out.fields.append(FieldChange(path="display.passwordFile", before=had.passwordFile,
                                      after=want.passwordFile, mode=Mode.RESTART, how=cause.split(": ", 1)[1]))
    if not had.enabled:
        return
    if live is None or (live.protocol, live.host, live.port) != (had.type, had.listen, had.port):
        now = f"{live.protocol} on {live.host}:{live.port}" if live is not None else "not listening"
        out.restart_causes.append(f"display drift: QEMU's display server is {now}, it was started on "
                                  f"{had.listen}:{had.port} (a restart puts it back)")
