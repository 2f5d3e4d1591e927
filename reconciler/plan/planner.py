"""``plan(desired, observed, last_applied) -> Plan``: the pure heart of the reconciler.

For each VM it decides one action and the ordered steps that carry it out, from three inputs only:
the desired VMs (manifests), the observed host (``ObservedState``) and the last-applied records. No I/O,
no clock, no randomness: the same inputs give a byte-identical plan. The per-field decisions come from
``plan.fields``; this module only combines them. Called by the CLI (plan, apply, status) and the sync loop.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.plan import display, drift, firmware, hostdev, media, placement, policy, runstate
from reconciler.plan import steps as s
from reconciler.plan.actions import Action, Change, FieldChange, Mode, Plan
from reconciler.plan.fields import rule_for
from reconciler.plan.live import LivePlan, plan_live
from reconciler.plan.networks import plan_networks, tap_repairs
from reconciler.plan.observed import ObservedImage, ObservedProcess, ObservedState, ObservedVM
from reconciler.spec.host import HostConfig
from reconciler.spec.models import CIDATA, DiskSpec, Network, VirtualMachine, VirtualMachineSpec, secret_digest
from reconciler.spec.naming import disk_node, host_device
from reconciler.spec.units import format_size
from reconciler.state import paths
from reconciler.state.models import STOPPED, AppliedRecord

Path_ = tuple[str, ...]


_KEYED = ("disks", "networks", "cdroms", "channels", "hostDevices")


def flatten(spec: VirtualMachineSpec) -> dict[Path_, Any]:
    """Spec fields as path -> value, with disks and NICs keyed by name (so order never matters)."""
    data = spec.model_dump(mode="python")
    flat: dict[Path_, Any] = {}

    def walk(prefix: Path_, value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                walk((*prefix, key), value[key])
        else:
            flat[prefix] = value

    for key in sorted(data):
        value = data[key]
        if key in _KEYED:
            for item in value:
                flat[(key, item["name"])] = "present"
                walk((key, item["name"]), {k: v for k, v in item.items() if k != "name"})
        else:
            walk((key,), value)
    return flat


def field_diff(before: VirtualMachineSpec, after: VirtualMachineSpec) -> list[tuple[Path_, Any, Any]]:
    """Every leaf that differs, sorted by path. A whole disk/NIC added or removed is one entry."""
    if before == after:
        return []  # the common case (every VM of a no-op plan), without dumping and flattening both specs
    old, new = flatten(before), flatten(after)
    changed: list[tuple[Path_, Any, Any]] = []
    gone_items = {path for path in old if len(path) == 2 and path[0] in _KEYED and path not in new}
    new_items = {path for path in new if len(path) == 2 and path[0] in _KEYED and path not in old}
    whole = gone_items | new_items
    for path in sorted(set(old) | set(new)):
        if path[:2] in whole and len(path) > 2:
            continue  # reported once, as the item being added or removed
        if old.get(path) != new.get(path):
            changed.append((path, old.get(path), new.get(path)))
    return changed


def _fmt(path: Path_, value: Any) -> Any:
    """Values as people read them: sizes in 1024 units, structures as compact JSON."""
    if path and path[-1].lower().endswith("size") and isinstance(value, int):
        return format_size(value)
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(", ", ": "))
    return value


def _dotted(path: Path_) -> str:
    head, *rest = path
    if head in _KEYED and rest:
        name, *tail = rest
        return f"{head}[{name}]" + "".join(f".{part}" for part in tail)
    return ".".join(str(part) for part in path)  # map keys may be numbers (cpu.placement.vcpuPins)


@dataclass(frozen=True)
class PlanOptions:
    allow_restart: bool = False
    start: frozenset[str] = frozenset()  # `infinization start NAME`: start it whatever its runStrategy says
    stop: frozenset[str] = frozenset()  # `infinization stop NAME`
    resume: frozenset[str] = frozenset()  # `infinization resume NAME`: even when QEMU paused it (io-error...)
    # A VM whose record says it came from another manifest directory is not deleted unless this is set:
    # `apply DIR` on the wrong directory must not read as "every other VM's manifest was removed".
    prune_other_sources: bool = False


@dataclass
class _VMPlan:
    """Scratch space while one VM's change is worked out."""

    name: str
    reasons: list[str] = field(default_factory=list)
    fields: list[FieldChange] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    restart_causes: list[str] = field(default_factory=list)
    offline: list[s.Step] = field(default_factory=list)  # safe whether QEMU runs or not: create, offline grow
    stopped: list[s.Step] = field(default_factory=list)  # only once QEMU is gone: a new UEFI variable store
    live_grows: list[s.Step] = field(default_factory=list)  # need the running QEMU (also before a restart)
    repairs: list[s.Step] = field(default_factory=list)  # TAPs re-attached to their bridge
    live: LivePlan | None = None  # hot-plug, unplug and settings, when QEMU runs and answers
    display: list[s.Step] = field(default_factory=list)  # the display's password, set on the running QEMU


def plan(
    desired: Mapping[str, VirtualMachine],
    observed: ObservedState,
    last_applied: Mapping[str, AppliedRecord],
    *,
    networks: Mapping[str, Network] | None = None,
    manifest_dir: str = "",
    desired_digest: str = "",
    options: PlanOptions | None = None,
    host: HostConfig | None = None,
    only: Collection[str] | None = None,
) -> Plan:
    """Compute the plan. ``desired`` must be a complete, valid set: a VM missing from it is deleted.

    Order: Networks (bridges) and the firewall first, then VMs, then Networks being deleted. ``host`` is
    the host's policy (what manifests may use); the defaults when not given.

    ``only``: plan just these VMs (the sync loop's reconcile of one key, whose snapshot observed only that
    VM); Networks and the firewall are planned whole all the same. Choices that depend on every VM (display
    ports, CPU placement) still see all of ``desired``; the hugepages other VMs would take are not deducted,
    as they are not being started by this plan.
    """
    options = options or PlanOptions()
    host = host or HostConfig()
    networks = networks or {}
    net = plan_networks(networks, desired, observed)
    names = sorted(set(desired) | set(last_applied) | {n for n, vm in observed.vms.items() if vm.process or vm.tpm_pid}
                   | {claim.vm for claim in observed.devices.claims.values()})
    if only is not None:
        names = [name for name in names if name in only]
    changes = list(net.first)
    ports = display.assign_ports(desired, observed, host)
    chosen = placement.choose_all(desired, last_applied, observed.cpu_host)
    budget = observed  # hugepages taken by the VMs planned so far are not free for the next ones
    for name in names:
        vm = desired.get(name)
        record = last_applied.get(name)
        if vm:
            change: Change | None = _plan_vm(name, vm, budget, record, options, networks, host, desired,
                                             ports.get(name), chosen.get(name))
            budget = placement.after_hugepages(budget, name, change.steps if change else [], vm.spec)
        else:
            change = _plan_missing(name, observed.vm(name), record, observed, _foreign(record, manifest_dir, options))
        if change is not None and change.steps and name in net.blocked:
            change = change.model_copy(update={"steps": [], "opens": [], "refusals": [net.blocked[name]]})
        if change is not None:
            changes.append(change)
    changes += net.last
    return Plan.planned(
        manifest_dir=manifest_dir,
        state_dir=observed.state_dir,
        desired_digest=desired_digest,
        observed_digest=observed.digest(),
        allow_restart=options.allow_restart,
        prune_other_sources=options.prune_other_sources,
        changes=changes,
    )


def _plan_vm(name: str, manifest: VirtualMachine, observed: ObservedState, record: AppliedRecord | None,
             options: PlanOptions, networks: Mapping[str, Network], host: HostConfig,
             others: Mapping[str, VirtualMachine], port: int | str | None = None,
             chosen: list[int] | str | None = None) -> Change:
    """One desired VM. The host policy first: a path or port it refuses refuses the whole change. Past it,
    the VM is compared with its paths resolved (what QEMU was, or will be, given); the record keeps the
    manifest as written."""
    verdict = policy.check_vm(manifest.spec, observed.paths, host, observed.state_dir)
    refusals = [*verdict.refusals, *firmware.refusals(manifest.spec, observed.paths, host, observed.state_dir),
                *hostdev.refusals(name, manifest.spec, observed, host, others),
                *_memory_refusals(manifest.spec, observed.host_memory)]
    if verdict.spec is None or refusals:
        return Change.planned(name=name, action=Action.NOOP, refusals=refusals)
    desired = manifest.model_copy(update={"spec": verdict.spec})
    obs = observed.vm(name)
    work = _VMPlan(name)
    desired = _display(work, _media(work, desired, obs, record, observed.state_dir), obs, observed, port)
    live = obs.process.live if obs.process else None
    _gather(work, desired, obs, record, observed, networks, host)
    # The record is rewritten when something else happens, or when a field that is only recorded
    # (labels, deletePolicy...) changed; a pending restart alone does not rewrite it.
    recorded_changes = _record_only_fields(work, record.vm, manifest) if record is not None else 0
    recorded_changes += _cloud_init_change(work, record, manifest)
    allowed = options.allow_restart or desired.spec.restartPolicy == "Auto"
    _check_slots(work, live.free_slots if live else 0, allowed)
    work.fields = drift.mark(work.fields, _manifest_changes(record, manifest))
    if work.refusals:
        return Change.planned(name=name, action=Action.NOOP, reasons=work.reasons, fields=work.fields,
                              refusals=work.refusals)
    steps, action, pending = _choose(work, desired.spec, obs, record is not None, options, allowed)
    if work.refusals:  # a VM QEMU paused by itself, to go on running: not resumed blindly
        return Change.planned(name=name, action=Action.NOOP, reasons=work.reasons, fields=work.fields,
                              refusals=work.refusals)
    steps, nothing = _devices_and_boot(work, desired.spec, obs, steps, observed)
    if nothing:
        return Change.planned(name=name, action=Action.NOOP, reasons=work.reasons, refusals=[nothing])
    steps, refused = _placement(work, desired.spec, obs, record, chosen, observed, host, steps)
    if refused:
        return Change.planned(name=name, action=Action.NOOP, reasons=work.reasons, fields=work.fields, refusals=refused)
    if steps or record is None or recorded_changes:
        steps = [s.WriteRecord(name=name, summary="record the desired spec as last applied", vm=manifest), *steps]
    if action is Action.NOOP and steps:
        action = Action.CREATE if record is None else Action.UPDATE
    unplug_pending = work.live.unplug_pending if work.live and action is not Action.RESTART else []
    work.fields = drift.mark(work.fields, _manifest_changes(record, manifest))  # placement's fields too
    opens = media.shown_opens([*policy.opens(manifest.spec, steps, observed.paths), *_firmware_opens(
        steps, firmware.select(desired.spec, observed.paths, host, observed.state_dir))], desired.spec)
    return Change.planned(name=name, action=action, reasons=work.reasons, fields=work.fields, steps=s.in_order(steps),
                          pending_restart=pending, refusals=[], unplug_pending=unplug_pending, opens=opens)


def _devices_and_boot(work: _VMPlan, spec: VirtualMachineSpec, obs: ObservedVM, steps: list[s.Step],
                      observed: ObservedState) -> tuple[list[s.Step], str | None]:
    """The swtpm left without its QEMU, a QEMU launched but never recorded, and the host devices the steps
    need; a start with nothing to boot is refused (the refusal)."""
    steps = [*steps, *_orphan_tpm(work.reasons, obs), *_unrecorded_launch(work.reasons, obs, steps)]
    steps += _host_devices(work, spec, obs, steps, observed)
    nothing = firmware.boot_refusal(spec)
    return steps, nothing if nothing and any(isinstance(step, s.Start) for step in steps) else None


def _manifest_changes(record: AppliedRecord | None, manifest: VirtualMachine) -> list[str] | None:
    """The dotted paths the manifest changed since it was last applied (None: never applied)."""
    if record is None:
        return None
    changed = [_dotted(path) for path, _, _ in field_diff(record.vm.spec, manifest.spec)]
    if any(path.startswith("cloudInit") for path in changed):
        changed.append(f"cdroms[{CIDATA}]")  # the seed CD-ROM is made from cloudInit
    return changed + (["metadata.labels"] if record.vm.metadata.labels != manifest.metadata.labels else [])


def _placement(work: _VMPlan, spec: VirtualMachineSpec, obs: ObservedVM, record: AppliedRecord | None,
               chosen: list[int] | str | None, observed: ObservedState, host: HostConfig,
               steps: list[s.Step]) -> tuple[list[s.Step], list[str]]:
    """CPU placement and hugepages for one VM's steps: the host prerequisites (refusals), enough free hugepages
    for a start or a DIMM, DIMMs on hugepages when the base memory is, and the set-placement step."""
    process = obs.process
    launched = process.launched if process else None
    starting = any(isinstance(step, s.Start) for step in steps)
    running = None
    if process is not None and process.live is not None and process.placement is not None and not starting:
        running = (process.placement, process.live.vcpu_threads)
    placed = placement.plan_vm(work.name, spec, record, chosen, observed.cpu_host, host, running, starting, launched,
                               any(isinstance(step, s.AddCpus) for step in steps))
    steps, refusals = placement.hugepages(spec, process, steps, observed.cpu_host, host)
    placed.refusals += refusals
    work.reasons += placed.reasons
    work.fields += placed.fields
    return [*steps, *placed.steps], placed.refusals


def _memory_refusals(spec: VirtualMachineSpec, host_memory: int | None) -> list[str]:
    """Memory the host does not have: QEMU fails to start ("cannot set up guest memory"), or a later
    DIMM hot-plug fails. Checked here because it depends on the host (``spec.limits`` has the rest)."""
    if host_memory is None:
        return []
    found = []
    for name, value in (("size", spec.memory.size), ("maxSize", spec.memory.maxSize)):
        if value is not None and value > host_memory:
            found.append(f"spec.memory.{name}: {format_size(value)} is more than this host's "
                         f"{format_size(host_memory // 1024**2 * 1024**2)} of RAM")
    return found


def _gather(work: _VMPlan, desired: VirtualMachine, obs: ObservedVM, record: AppliedRecord | None,
            observed: ObservedState, networks: Mapping[str, Network], host: HostConfig) -> None:
    """The VM's disks, its UEFI variable store, and (when QEMU runs) restart causes and live changes."""
    live = obs.process.live if obs.process else None
    attached = {disk for disk, state in live.disks.items() if state.device} if live else set()
    for disk in desired.spec.disks:
        _plan_disk(work, disk, obs.disks.get(disk.name), observed, obs.process is not None, disk.name in attached)
    _efi_vars(work, desired.spec, obs, observed, host)
    if obs.process is not None:
        _running_vm(work, desired, obs.process, record, observed, networks)
        _lost_tpm(work, obs)
    _reset_efi_vars(work, desired.spec, obs, record, observed, host)  # after the restart causes it may repeat


def _efi_vars(work: _VMPlan, spec: VirtualMachineSpec, obs: ObservedVM, observed: ObservedState,
              host: HostConfig) -> None:
    """A UEFI VM's own variable store, copied once from OVMF's template (an existing one is kept)."""
    found = firmware.select(spec, observed.paths, host, observed.state_dir)
    if isinstance(found, firmware.Firmware) and not obs.efi_vars:
        path = paths.efi_vars(observed.state_dir, work.name)
        work.offline.append(s.CreateEfiVars(name=work.name, target="efivars", path=path, template=found.vars_template,
                                            secure_boot=found.secure_boot,
                                            summary=f"UEFI variables: copy {found.vars_template} to {path} (once; "
                                            "kept across restarts, deleted only with the VM and all its disks)"))


def _host_devices(work: _VMPlan, spec: VirtualMachineSpec, obs: ObservedVM, steps: list[s.Step],
                  observed: ObservedState) -> list[s.Step]:
    """Take the host devices the VM's QEMU will have once these steps ran; give back those it will not."""
    keep: set[str] = set()
    live = obs.process.live if obs.process else None
    if any(isinstance(step, s.Start) for step in steps):
        devices = list(spec.hostDevices)
    elif any(isinstance(step, s.Stop) for step in steps) or obs.process is None:
        devices = []
    elif live is None:
        devices = list((obs.process.launched or spec).hostDevices)
    else:  # runs on: what it has (as it was plugged) and keeps, what is plugged now; a pending unplug keeps it
        plugged = {step.target for step in steps if isinstance(step, s.HotplugHostDevice)}
        had = {d.name: d for d in (obs.process.launched or spec).hostDevices}
        devices = [had.get(d.name, d) if d.name in live.host_devices else d for d in spec.hostDevices
                   if d.name in live.host_devices or d.name in plugged]
        keep = {name for name in live.host_devices if host_device(name) in live.pending_unplugs}
    found, reasons = hostdev.steps(work.name, devices, keep, observed)
    work.reasons += reasons
    return found
def _lost_tpm(work: _VMPlan, obs: ObservedVM) -> None:
    """QEMU started with a TPM whose swtpm is gone (it died or was killed): the guest's TPM fails every command
    until QEMU restarts with a new swtpm on the same state (QEMU cannot reconnect a tpm-emulator backend)."""
    launched = obs.process.launched if obs.process else None
    if launched is not None and launched.tpm.enabled and obs.tpm_pid is None:
        work.restart_causes.append("tpm: its swtpm (the TPM emulator) is gone while QEMU runs: the guest's TPM "
                                   "fails until QEMU restarts with a new swtpm on the same TPM state")


def _reset_efi_vars(work: _VMPlan, spec: VirtualMachineSpec, obs: ObservedVM, record: AppliedRecord | None,
                    observed: ObservedState, host: HostConfig) -> None:
    """Secure Boot turned on or off for a VM that has its variable store: the keys are in the store, so it
    is replaced from the new template once QEMU is gone (the old one kept as a dated backup; the guest's
    boot entries go with it). Its origin is on file; a store made before that is assumed to come from the
    template the last applied spec asked for."""
    found = firmware.select(spec, observed.paths, host, observed.state_dir)
    if not isinstance(found, firmware.Firmware) or not obs.efi_vars:
        return
    origin = obs.efi_vars_secure_boot
    if origin is None and record is not None and record.vm.spec.firmware.type == "uefi":
        origin = record.vm.spec.firmware.secureBoot
    if origin is None or origin == found.secure_boot:
        return
    why = (f"spec.firmware.secureBoot is {'on' if found.secure_boot else 'off'} but the UEFI variable store came "
           f"from the template {'with' if origin else 'without'} Secure Boot keys: it is replaced from "
           f"{found.vars_template} (the old store is kept as a dated backup; the guest's boot entries are reset)")
    if obs.process is None:
        work.reasons.append(why)
    elif not any(cause.startswith("firmware.secureBoot changed") for cause in work.restart_causes):
        work.restart_causes.append(why)  # QEMU runs with the desired code but the other keys
    work.stopped.append(s.ResetEfiVars(
        name=work.name, target="efivars", path=obs.efi_vars, template=found.vars_template,
        secure_boot=found.secure_boot,
        summary=f"UEFI variables: keep {obs.efi_vars} as {obs.efi_vars}.<UTC time>.bak and copy "
                f"{found.vars_template} (Secure Boot {'on' if found.secure_boot else 'off'}: the guest's boot "
                "entries are reset)"))


def _firmware_opens(steps: list[s.Step], found: firmware.Firmware | str | None) -> list[str]:
    """The OVMF files a start (its code) or the variable store's copy (its template) opens."""
    if not isinstance(found, firmware.Firmware):
        return []
    shown = [f"firmware: code {found.code}"] if any(isinstance(step, s.Start) for step in steps) else []
    return shown + [f"firmware: VARS template {step.template}" for step in steps
                    if isinstance(step, s.CreateEfiVars | s.ResetEfiVars)]


def _media(work: _VMPlan, desired: VirtualMachine, obs: ObservedVM, record: AppliedRecord | None,
           state_dir: str) -> VirtualMachine:
    """Installs the guest ended become a finish-install step (done, not drift); the VM as QEMU gets it."""
    installs = record.installs if record else []
    if desired.spec.cloudInit is not None and any(cdrom.name == CIDATA for cdrom in desired.spec.cdroms):
        work.refusals.append(f"spec.cdroms[{CIDATA}]: the name is taken by cloudInit's seed; rename the CD-ROM")
    ended = media.ended_installs(desired.spec, installs, obs)
    if ended:
        eject = [c.name for c in desired.spec.cdroms if c.name in ended and c.ejectAfterInstall]
        what = ", ".join(f"{cd}" + (" (medium ejected)" if cd in eject else "") for cd in ended)
        work.reasons.append(f"the install from CD-ROM {what} ended: the guest powered off or rebooted")
        work.offline.append(s.FinishInstall(name=work.name, cdroms=ended, ejected=eject,
                                            summary=f"record the install from {', '.join(ended)} as done"
                                            + (f"; eject {', '.join(eject)}" if eject else "")))
        installs = [i.model_copy(update={"done": True}) if i.cdrom in ended else i for i in installs]
    return desired.model_copy(update={"spec": media.effective_spec(work.name, desired.spec, installs, state_dir)})


def _display(work: _VMPlan, desired: VirtualMachine, obs: ObservedVM, observed: ObservedState,
             port: int | str | None) -> VirtualMachine:
    """The display's port (the VM as QEMU gets it has it resolved), its password, refusals and restart causes."""
    spec = display.with_port(desired.spec, port) if isinstance(port, int) else desired.spec
    planned = display.plan_display(work.name, spec, obs, observed, port)
    work.refusals += planned.refusals
    work.restart_causes += planned.restart_causes
    work.reasons += planned.reasons
    work.fields += planned.fields
    work.offline += planned.steps
    work.display += planned.live
    return desired.model_copy(update={"spec": spec})


def _cloud_init_change(work: _VMPlan, record: AppliedRecord | None, manifest: VirtualMachine) -> int:
    """A changed cloud-init seed, shown by hash (user-data may hold passwords): 1 when it changed."""
    before, after = (record.vm.spec.cloudInit if record else None), manifest.spec.cloudInit
    if record is None or before == after:
        return 0
    work.fields.append(FieldChange(path="cloudInit", before=_seed_label(before), after=_seed_label(after),
                                   mode=Mode.LIVE, how="seed rebuilt; takes effect on the next boot; cloud-init "
                                   "runs it only for a new instance-id"))
    return 1


def _seed_label(cloud_init: Any) -> str | None:
    if cloud_init is None:
        return None
    network = ", network-config" if cloud_init.networkConfig is not None else ""
    return f"user-data sha256:{secret_digest(cloud_init.userData)[:12]}{network}"


def _check_slots(work: _VMPlan, free: int, allowed: bool) -> None:
    """Devices to hot-plug beyond the free slots: a restart cause when allowed, else a refusal."""
    if work.live is None or work.live.slots_needed <= free:
        return
    message = (f"{work.live.slots_needed} device(s) to hot-plug but only {free} free hot-plug slot(s) "
               f"(spec.hotplugSlots, fixed when QEMU started)")
    if allowed:
        work.restart_causes.append(message)
    else:
        work.refusals.append(message + "; apply --allow-restart to plug them by restarting instead")


def _choose(work: _VMPlan, spec: VirtualMachineSpec, obs: ObservedVM, known: bool, options: PlanOptions,
            allowed: bool) -> tuple[list[s.Step], Action, list[str]]:
    """The VM's steps (before sorting), its action and its pending restart causes, by situation: to be
    stopped, stopped, to be restarted, or changed live."""
    name = work.name
    launched = obs.process.launched if obs.process else None
    stop = _stop_step(name, spec.terminationGracePeriodSeconds, launched is not None and launched.guestAgent.enabled,
                      obs.process.status if obs.process else None)
    if obs.process is not None and (spec.runStrategy == "Halted" or name in options.stop):
        work.reasons.append("stopped by `infinization stop`" if name in options.stop else
                            "runStrategy is Halted and the VM is running"
                            + ("" if obs.process.status == runstate.RUNNING else f" ({obs.process.status})"))
        return [stop, *work.offline, *work.stopped], Action.NOOP, []
    if obs.process is None:
        why_start = "started by `infinization start`" if name in options.start else _start_reason(
            spec.runStrategy, known, obs.last_exit)
        if not why_start:
            return [*work.offline, *work.stopped], Action.NOOP, []
        work.reasons.append(why_start)
        return [*work.offline, *work.stopped, _start_step(name, spec.paused)], Action.NOOP, []
    if work.restart_causes and allowed:
        permission = "--allow-restart" if options.allow_restart else "restartPolicy: Auto"
        work.reasons.append(f"a restart is allowed ({permission}) and needed for:")
        work.reasons += [f"  {cause}" for cause in work.restart_causes]
        start = _start_step(name, spec.paused)
        return [*work.live_grows, *work.offline, stop, *work.stopped, start], Action.RESTART, []
    live_steps = work.live.steps if work.live else []
    work.fields += work.live.fields if work.live else []
    run = runstate.plan_run_state(name, spec.paused, obs.process.status, name in options.resume)
    work.reasons += run.reasons
    work.fields += run.fields
    work.refusals += run.refusals
    steps = [*work.offline, *work.live_grows, *work.repairs, *work.display, *live_steps, *run.steps]
    return steps, Action.NOOP, list(work.restart_causes)


def _start_step(name: str, paused: bool) -> s.Start:
    if paused:  # -S: no guest code runs before it is resumed (a restart of a paused VM comes back paused)
        return s.Start(name=name, summary="start QEMU paused (-S: its guest does not run until resumed) and wait "
                       "for its monitor")
    return s.Start(name=name, summary="start QEMU and wait for its monitor")


def _start_reason(strategy: str, known: bool, last_exit: str | None) -> str | None:
    """Why a stopped VM is to be started, or None to leave it stopped."""
    if strategy == "Always":
        return "the VM is not running and runStrategy is Always" if known else "new VM"
    if strategy == "RerunOnFailure":
        if last_exit == "guest-shutdown":
            return None  # the guest shut itself down cleanly: that is not a failure
        if last_exit == STOPPED:
            return "infinization stopped the VM (Halted, Manual or a stop) and runStrategy is now RerunOnFailure"
        if last_exit:
            return f"the VM stopped ({last_exit}) and runStrategy is RerunOnFailure"
        return "the VM is not running and runStrategy is RerunOnFailure" if known else "new VM"
    return None  # Manual and Halted: the reconciler never starts it


def _running_vm(work: _VMPlan, desired: VirtualMachine, process: ObservedProcess, record: AppliedRecord | None,
                observed: ObservedState, networks: Mapping[str, Network]) -> None:
    """Restart causes, live changes and TAP repairs for a VM whose QEMU runs."""
    spec = desired.spec
    if process.launched is None:
        work.restart_causes.append("the running QEMU has no launch record to compare with")
    elif process.live is None:
        # A stuck QEMU (stopped, hung, its monitor gone): nothing can be changed live, but a restart (which
        # kills the verified process when it does not quit) recovers it; it waits for --allow-restart.
        work.restart_causes.append(f"its QMP monitor does not answer (status: {process.status}): nothing can be "
                                   "changed live; a restart kills its verified QEMU and starts it again")
    else:
        _restart_causes(work, spec, process.launched)
        work.live = plan_live(work.name, spec, process.launched, process.live)
        work.restart_causes += work.live.restart_causes
    # NICs that are plugged and were bridged when plugged (per the launch or last-applied spec).
    before = [*(process.launched.networks if process.launched else []), *(record.vm.spec.networks if record else [])]
    bridged = {nic.name for nic in before if nic.type == "bridge"}
    live = process.live
    plugged = {nic for nic, state in live.nics.items() if state.device and nic in bridged} if live else set()
    repairs, repair_fields, tap_causes = tap_repairs(desired, networks, observed, plugged)
    work.repairs += repairs
    work.fields += repair_fields
    work.restart_causes += tap_causes


def _stop_step(name: str, grace: int, agent: bool = False, status: str | None = None) -> s.Stop:
    """The graceful stop: the guest agent's shutdown first when QEMU was started with its port (the
    executor tries it, then ACPI), all within ``grace``, then quit. A paused guest cannot see either, so the
    executor resumes it first; one started with -S never ran and is quit at once."""
    if status == "prelaunch":
        return s.Stop(name=name, timeout=grace, summary="stop: quit (started paused with -S, its guest never ran)")
    first = "guest agent, then ACPI power button" if agent else "ACPI power button"
    resumed = "resume the paused guest, then " if status == "paused" else ""
    return s.Stop(name=name, timeout=grace,
                  summary=f"stop gracefully ({resumed}{first} for up to {grace}s, then quit)")


def _plan_disk(work: _VMPlan, disk: DiskSpec, current: ObservedImage | None, observed: ObservedState,
               running: bool, attached: bool) -> None:
    if current is None or not current.exists:
        _new_disk(work, disk, paths.disk_file(observed.state_dir, work.name, disk.name), observed, running)
    elif _usable_disk(work, disk, current):
        _grow_disk(work, disk, current, running and attached)


def _new_disk(work: _VMPlan, disk: DiskSpec, path: str, observed: ObservedState, running: bool) -> None:
    label = f"disk {disk.name}"
    base = observed.images.get(disk.image) if disk.image else None
    if disk.image and (base is None or not base.exists):
        work.refusals.append(f"{label}: backing image {disk.image} does not exist")
        return
    if base is not None and disk.size is not None and base.virtual_size and disk.size < base.virtual_size:
        work.refusals.append(f"{label}: size {format_size(disk.size)} is smaller than its image "
                             f"({format_size(base.virtual_size)}); disks never shrink")
        return
    size = disk.size if disk.size is not None else (base.virtual_size if base else None)
    what = f"create {format_size(size)} qcow2" if size else "create qcow2"
    if disk.preallocation != "off":
        what += f" (preallocation={disk.preallocation})"
    if disk.image:
        what += f" backed by {disk.image}"
    work.offline.append(s.CreateDisk(name=work.name, target=disk.name, summary=f"{label}: {what}", path=path,
                                     size=disk.size, image=disk.image, image_format=disk.imageFormat,
                                     preallocation=disk.preallocation))
    if not running:  # on a running VM the new disk is a restart cause, listed as such
        work.fields.append(FieldChange(path=f"disks[{disk.name}]", before=None, after="present", mode=Mode.LIVE,
                                       how="qemu-img create"))


def _usable_disk(work: _VMPlan, disk: DiskSpec, current: ObservedImage) -> bool:
    """An existing disk file is readable qcow2 on the backing image the manifest names; else refused."""
    label = f"disk {disk.name}"
    if current.error:
        work.refusals.append(f"{label}: cannot read {current.path}: {current.error}")
    elif current.format != "qcow2":
        work.refusals.append(f"{label}: {current.path} is {current.format}, expected qcow2")
    elif disk.image and current.backing != disk.image:
        work.refusals.append(f"{label}: its backing image is {current.backing or 'none'}, the manifest says "
                             f"{disk.image}; a disk's image cannot change (give the disk a new name)")
        work.fields.append(FieldChange(path=f"disks[{disk.name}].image", before=current.backing, after=disk.image,
                                       mode=Mode.REFUSED, how=rule_for(("disks", "*", "image")).how))
    elif disk.image and current.backing_format and current.backing_format != disk.imageFormat:
        work.refusals.append(f"{label}: its backing image is {current.backing_format}, the manifest says "
                             f"{disk.imageFormat}; a disk's image cannot change")
        work.fields.append(FieldChange(path=f"disks[{disk.name}].imageFormat", before=current.backing_format,
                                       after=disk.imageFormat, mode=Mode.REFUSED,
                                       how=rule_for(("disks", "*", "imageFormat")).how))
    else:
        return True
    return False


def _grow_disk(work: _VMPlan, disk: DiskSpec, current: ObservedImage, attached_live: bool) -> None:
    if disk.size is None or current.virtual_size is None or disk.size == current.virtual_size:
        return
    label, path = f"disk {disk.name}", current.path
    before, after = format_size(current.virtual_size), format_size(disk.size)
    if disk.size < current.virtual_size:
        work.refusals.append(f"{label}: shrinking {before} -> {after} is refused; disks never shrink")
        work.fields.append(FieldChange(path=f"disks[{disk.name}].size", before=before, after=after,
                                       mode=Mode.REFUSED, how="disks never shrink"))
        return
    if attached_live:
        work.live_grows.append(s.GrowDiskLive(name=work.name, target=disk.name, node=disk_node(disk.name),
                                              size=disk.size, path=path,
                                              summary=f"{label}: grow {before} -> {after} (block_resize)"))
        how = "block_resize"
    else:
        work.offline.append(s.GrowDiskOffline(name=work.name, target=disk.name, size=disk.size, path=path,
                                              summary=f"{label}: grow {before} -> {after} (qemu-img resize)"))
        how = "qemu-img resize (VM stopped)"
    work.fields.append(FieldChange(path=f"disks[{disk.name}].size", before=before, after=after, mode=Mode.LIVE,
                                   how=how))


# Fields compared with what the live VM reports rather than with its launch record.
_OBSERVED_LIVE: frozenset[Path_] = frozenset({("networks", "*", "mac")})


def _restart_causes(work: _VMPlan, spec: VirtualMachineSpec, launched: VirtualMachineSpec) -> None:
    """Fields fixed at start whose desired value differs from what the running QEMU was started with."""
    for path, before, after in field_diff(launched, spec):
        rule = rule_for(path)
        if rule.mode is not Mode.RESTART or rule.pattern in _OBSERVED_LIVE:
            continue
        label = _dotted(path)
        before, after = _fmt(path, before), _fmt(path, after)
        if len(path) == 2 and path[0] in _KEYED:
            cause = f"{label} {'added' if after else 'removed'}"
        else:
            cause = f"{label} changed ({before} -> {after})"
        work.restart_causes.append(f"{cause}: {rule.how}")
        work.fields.append(FieldChange(path=label, before=before, after=after, mode=Mode.RESTART, how=rule.how))


def _record_only_fields(work: _VMPlan, before: VirtualMachine, after: VirtualMachine) -> int:
    """Add the changed fields that only the record holds; return how many there are."""
    count = 0
    if before.metadata.labels != after.metadata.labels:
        work.fields.append(FieldChange(path="metadata.labels", before=_fmt((), before.metadata.labels),
                                       after=_fmt((), after.metadata.labels), mode=Mode.LIVE, how="recorded"))
        count += 1
    for path, old, new in field_diff(before.spec, after.spec):
        rule = rule_for(path)
        if rule.mode is Mode.LIVE and rule.how == "recorded":
            work.fields.append(FieldChange(path=_dotted(path), before=_fmt(path, old), after=_fmt(path, new),
                                           mode=Mode.LIVE, how=rule.how))
            count += 1
    return count


def _orphan_tpm(reasons: list[str], obs: ObservedVM) -> list[s.Step]:
    """A swtpm of ours that runs without its QEMU (a crash, a kill -9 between the two launches): stop it."""
    if obs.process is not None or obs.tpm_pid is None:
        return []
    reasons.append(f"its swtpm (pid {obs.tpm_pid}) runs without its QEMU")
    return [s.StopTpm(name=obs.name, summary=f"stop swtpm pid {obs.tpm_pid}, left without its QEMU")]


def _unrecorded_launch(reasons: list[str], obs: ObservedVM, steps: list[s.Step]) -> list[s.Step]:
    """A QEMU adopted from a launch.json that does not name its pid (a start interrupted between the launch
    and its record): record it, unless the plan stops it anyway."""
    process = obs.process
    if process is None or process.recorded or any(isinstance(step, s.Stop) for step in steps):
        return []
    reasons.append(f"its QEMU (pid {process.pid}) was launched by a start that was interrupted before recording it")
    return [s.RecordLaunch(name=obs.name, pid=process.pid,
                           summary=f"record QEMU pid {process.pid} in launch.json and move it into its cgroup")]


def _delete_tpm(name: str, obs: ObservedVM, record: AppliedRecord, state_dir: str) -> tuple[list[s.Step], str]:
    """The TPM state goes with the VM only when every disk goes too (deletePolicy: Delete); else it is kept."""
    if not obs.tpm_state:
        return [], ""
    if all(disk.deletePolicy == "Delete" for disk in record.vm.spec.disks):
        path = paths.tpm_state(state_dir, name)
        return [s.DeleteTpmState(name=name, path=path, summary=f"delete the TPM state {path} (no disk of the VM "
                                 "is kept: deletePolicy: Delete)")], ""
    return [], "the TPM state"


def _foreign(record: AppliedRecord | None, manifest_dir: str, options: PlanOptions) -> str | None:
    """Why a VM missing from the manifests is kept rather than deleted: it was applied from another
    directory than the one planned (or from one we do not know); None when it may be deleted."""
    if record is None or not manifest_dir or options.prune_other_sources:
        return None
    if record.source is None:
        return "applied from an unknown directory (no source recorded); not pruned"
    if record.source.startswith(manifest_dir.rstrip("/") + "/"):
        return None
    return f"applied from {_directory(record.source)}; not pruned"


def _directory(source: str) -> str:
    """The directory of a recorded manifest file (the planner does no I/O, not even pathlib's)."""
    return source.rsplit("/", 1)[0] or "/"


def _plan_missing(name: str, obs: ObservedVM, record: AppliedRecord | None, observed: ObservedState,
                  foreign: str | None) -> Change | None:
    """A VM in no manifest: deleted, unless it came from another directory. Then nothing of it is touched
    (not its QEMU, not its disks, whatever their deletePolicy): another directory's apply, or
    `--prune-other-sources`, decides about it."""
    if foreign is None:
        return _plan_delete(name, obs, record, observed)
    return Change.planned(name=name, action=Action.NOOP, source=record.source if record else None,
                          kept=f"{foreign} (`--prune-other-sources` deletes it)")


def _delete_unrecorded(name: str, obs: ObservedVM, observed: ObservedState) -> Change | None:
    """A QEMU that is ours (its cmdline names our pidfile) but that we have no record of can only come from a
    crash before the record was written; stop it, there is nothing else of ours to remove."""
    released = hostdev.steps(name, [], set(), observed)[0]
    if obs.process is None and obs.tpm_pid is None:
        # host devices held for a VM nobody knows any more (a crash before its record): give them back
        return Change.planned(name=name, action=Action.DELETE, reasons=["holds host devices but is in no manifest"],
                              steps=released) if released else None
    return Change.planned(name=name, action=Action.DELETE, reasons=["running but not in any manifest"],
                          steps=[_stop_step(name, VirtualMachineSpec().terminationGracePeriodSeconds), *released,
                                 s.Forget(name=name, summary="forget the VM (disks are kept)")])


def _plan_delete(name: str, obs: ObservedVM, record: AppliedRecord | None, observed: ObservedState) -> Change | None:
    if record is None:
        return _delete_unrecorded(name, obs, observed)
    steps: list[s.Step] = _orphan_tpm([], obs)
    if obs.process is not None:
        launched = obs.process.launched
        steps.append(_stop_step(name, record.vm.spec.terminationGracePeriodSeconds,
                                launched is not None and launched.guestAgent.enabled))
    kept = []
    for disk in record.vm.spec.disks:
        image = obs.disks.get(disk.name)
        if disk.deletePolicy == "Delete" and disk.name in record.owned_disks and image and image.exists:
            steps.append(s.DeleteDisk(name=name, target=disk.name, path=image.path,
                                      summary=f"disk {disk.name}: delete {image.path} (deletePolicy: Delete)"))
        elif image and image.exists:
            kept.append(disk.name)
    state_dir = observed.state_dir
    tpm_steps, tpm_kept = _delete_tpm(name, obs, record, state_dir)
    steps += tpm_steps
    steps += hostdev.steps(name, [], set(), observed)[0]
    if obs.efi_vars and not kept:
        steps.append(s.DeleteEfiVars(name=name, target="efivars", path=obs.efi_vars, summary=f"UEFI variables: "
                                     f"delete {obs.efi_vars} (no disk is kept: all have deletePolicy: Delete)"))
    keeping = [f"disks: {', '.join(kept)}"] if kept else []
    keeping += [f"the UEFI variables {obs.efi_vars}"] if obs.efi_vars and kept else []
    summary = "forget the VM" + (f" (keeping {'; '.join(keeping)})" if keeping else "")
    summary += f" (keeping {tpm_kept})" if tpm_kept else ""
    steps.append(s.Forget(name=name, summary=summary))
    reason = "its manifest was removed" + (f" (applied from {_directory(record.source)})" if record.source else "")
    return Change.planned(name=name, action=Action.DELETE, reasons=[reason], steps=steps, source=record.source)
