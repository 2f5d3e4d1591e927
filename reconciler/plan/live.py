"""Live changes to a running VM: what to hot-plug, unplug or set, from desired vs the live QMP state.

Called by the planner for a VM whose QEMU runs. It compares the desired spec with ``LiveState`` (what the
VM has now) and with the spec QEMU was started with (for limits fixed at start: ``cpu.maxCpus``,
``memory.maxSize``, slots). A change it cannot make live becomes a restart cause, never a silent no-op.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from reconciler.plan import steps as s
from reconciler.plan.actions import FieldChange, Mode
from reconciler.plan.fields import rule_for
from reconciler.plan.observed import LiveState
from reconciler.spec.models import VirtualMachineSpec, nic_mac
from reconciler.spec.naming import cdrom_device, disk_node, host_device, nic_device
from reconciler.spec.units import format_size

_Unplug = type[s.UnplugDisk | s.UnplugNic | s.UnplugCdrom | s.UnplugHostDevice]


@dataclass
class LivePlan:
    name: str
    steps: list[s.Step] = field(default_factory=list)  # unplugs, plugs and settings; sorted by phase later
    fields: list[FieldChange] = field(default_factory=list)
    restart_causes: list[str] = field(default_factory=list)
    slots_needed: int = 0
    unplug_pending: list[str] = field(default_factory=list)

    def step(self, step: s.Step) -> None:
        self.steps.append(step)

    def changed(self, path: str, before: object, after: object, rule: tuple[str, ...], how: str = "") -> None:
        self.fields.append(FieldChange(path=path, before=before, after=after, mode=Mode.LIVE,
                                       how=how or rule_for(rule).how))


def plan_live(name: str, spec: VirtualMachineSpec, launched: VirtualMachineSpec, live: LiveState) -> LivePlan:
    work = LivePlan(name)
    _disks(work, spec, live)
    _nics(work, name, spec, live)
    _cdroms(work, spec, live)
    _cpus(work, spec, launched, live)
    _memory(work, spec, launched, live)
    _host_devices(work, spec, live)
    return work


def _host_devices(work: LivePlan, spec: VirtualMachineSpec, live: LiveState) -> None:
    """USB devices plug onto the xHCI controller (when the VM was started with one), PCI functions onto a
    spare root port; an unplugged one is given back to the host by a release step (plan/hostdev.py)."""
    _unplug_removed(work, live, live.host_devices, {d.name for d in spec.hostDevices}, device=host_device,
                    kind=s.UnplugHostDevice, label="host device", how="device_del, wait for DEVICE_DELETED",
                    field="hostDevices", how_field="unplug; then given back to the host")
    for device in spec.hostDevices:
        if device.name in live.host_devices:
            continue
        if device.usb is not None and not live.usb_controller:
            how = "the VM was started without an xHCI controller (added at start with the first USB device)"
            work.restart_causes.append(f"hostDevices[{device.name}] added: {how}")
            work.fields.append(FieldChange(path=f"hostDevices[{device.name}]", before=None, after="present",
                                           mode=Mode.RESTART, how=how))
            continue
        work.slots_needed += device.pci is not None
        where = "on the xHCI controller" if device.usb is not None else "on a spare root port"
        work.step(s.HotplugHostDevice(name=work.name, target=device.name,
                                      summary=f"host device {device.name}: hot-plug {where} (device_add)"))
        work.changed(f"hostDevices[{device.name}]", None, "present", ("hostDevices", "*"))


def _unplug_note(work: LivePlan, live: LiveState, device: str, what: str) -> str:
    if device in live.pending_unplugs:
        work.unplug_pending.append(f"{what}: the guest has not released it yet (finished by a later reconcile "
                                   "or the next reset)")
        return " (retry: unplug pending)"
    return ""


def _unplug_removed(work: LivePlan, live: LiveState, present: Iterable[str], wanted: set[str], *,
                    device: Callable[[str], str], kind: _Unplug, label: str, how: str, field: str,
                    how_field: str) -> None:
    """An unplug step for every device the VM has and the spec no longer lists."""
    for name in sorted(set(present) - wanted):
        note = _unplug_note(work, live, device(name), f"{label} {name}")
        work.step(kind(name=work.name, target=name, summary=f"{label} {name}: unplug ({how}){note}"))
        work.changed(f"{field}[{name}]", "present", None, (field, "*"), how_field)


def _ahci_cannot_hotplug(work: LivePlan, spec: VirtualMachineSpec, live: LiveState) -> set[str]:
    """sata disks to add or remove on the running VM: restart causes (q35's AHCI cannot hot-plug).
    Returns the names of those removed, which are left alone live."""
    how = "q35's AHCI cannot hot-plug: a restart"
    wanted = {d.name for d in spec.disks}
    removed = {n for n, d in live.disks.items() if d.driver == "ide-hd" and d.device and n not in wanted}
    added = {d.name for d in spec.disks if d.bus == "sata" and not (d.name in live.disks and
                                                                     live.disks[d.name].device)}
    for name, before, after in [*((n, "present", None) for n in sorted(removed)),
                                *((n, None, "present") for n in sorted(added))]:
        verb = "removed" if after is None else "added"
        work.restart_causes.append(f"disks[{name}] (bus sata) {verb}: {how}")
        work.fields.append(FieldChange(path=f"disks[{name}]", before=before, after=after, mode=Mode.RESTART,
                                       how=how))
    return removed | added


def _disks(work: LivePlan, spec: VirtualMachineSpec, live: LiveState) -> None:
    sata = _ahci_cannot_hotplug(work, spec, live)
    present = [name for name in live.disks if name not in sata]
    _unplug_removed(work, live, present, {d.name for d in spec.disks}, device=disk_node,
                    kind=s.UnplugDisk, label="disk", how="device_del, wait for DEVICE_DELETED, blockdev-del",
                    field="disks", how_field="unplug; the file is kept")
    for disk in spec.disks:
        have = live.disks.get(disk.name)
        if disk.name in sata:
            continue
        if have is None or not have.device:
            work.slots_needed += disk.bus == "virtio"  # a scsi disk joins the virtio-scsi controller
            work.step(s.HotplugDisk(name=work.name, target=disk.name, iops=disk.iops, bps=disk.bps,
                                    summary=f"disk {disk.name}: hot-plug (blockdev-add + device_add"
                                    f"{' on the virtio-scsi controller' if disk.bus == 'scsi' else ''})"))
            work.changed(f"disks[{disk.name}]", None, "present", ("disks", "*"))
        elif (have.iops, have.bps) != (disk.iops, disk.bps):
            work.step(s.SetIoLimits(name=work.name, target=disk.name, iops=disk.iops, bps=disk.bps,
                                    summary=f"disk {disk.name}: I/O limits iops={disk.iops} bps={disk.bps}"))
            work.changed(f"disks[{disk.name}].iops/bps", f"{have.iops}/{have.bps}", f"{disk.iops}/{disk.bps}",
                         ("disks", "*", "iops"))


def _nics(work: LivePlan, vm_name: str, spec: VirtualMachineSpec, live: LiveState) -> None:
    _unplug_removed(work, live, live.nics, {n.name for n in spec.networks}, device=nic_device,
                    kind=s.UnplugNic, label="NIC", how="device_del, wait for DEVICE_DELETED, netdev_del",
                    field="networks", how_field="unplug")
    for nic in spec.networks:
        have = live.nics.get(nic.name)
        mac = nic_mac(vm_name, nic)
        if have is None or not have.device:
            work.slots_needed += 1
            work.step(s.HotplugNic(name=work.name, target=nic.name, link=nic.link,
                                   summary=f"NIC {nic.name}: hot-plug {mac} (netdev_add + device_add)"))
            work.changed(f"networks[{nic.name}]", None, "present", ("networks", "*"))
            continue
        if have.mac != mac:
            work.restart_causes.append(f"networks[{nic.name}].mac changed ({have.mac} -> {mac}): "
                                       f"{rule_for(('networks', '*', 'mac')).how}")
            work.fields.append(FieldChange(path=f"networks[{nic.name}].mac", before=have.mac, after=mac,
                                           mode=Mode.RESTART, how=rule_for(("networks", "*", "mac")).how))
        if have.link != nic.link:
            work.step(s.SetLink(name=work.name, target=nic.name, up=nic.link == "up",
                                summary=f"NIC {nic.name}: link {nic.link} (set_link)"))
            work.changed(f"networks[{nic.name}].link", have.link, nic.link, ("networks", "*", "link"))


def _cdroms(work: LivePlan, spec: VirtualMachineSpec, live: LiveState) -> None:
    _unplug_removed(work, live, live.cdroms, {c.name for c in spec.cdroms}, device=cdrom_device,
                    kind=s.UnplugCdrom, label="CD-ROM", how="device_del", field="cdroms",
                    how_field="device_del")
    for cdrom in spec.cdroms:
        have = live.cdroms.get(cdrom.name)
        if have is None:
            what = f" with {cdrom.image}" if cdrom.image else " (empty)"
            work.step(s.HotplugCdrom(name=work.name, target=cdrom.name, image=cdrom.image,
                                     summary=f"CD-ROM {cdrom.name}: add drive{what}"))
            work.changed(f"cdroms[{cdrom.name}]", None, "present", ("cdroms", "*"))
        elif have.image != cdrom.image:
            verb = "eject" if cdrom.image is None else ("insert" if have.image is None else "change medium to")
            work.step(s.ChangeMedia(name=work.name, target=cdrom.name, image=cdrom.image,
                                    summary=f"CD-ROM {cdrom.name}: {verb} {cdrom.image or ''}".rstrip()))
            work.changed(f"cdroms[{cdrom.name}].image", have.image, cdrom.image, ("cdroms", "*", "image"))


def _cpus(work: LivePlan, spec: VirtualMachineSpec, launched: VirtualMachineSpec, live: LiveState) -> None:
    want, have, limit = spec.cpu.count, live.cpus, launched.cpu.max_count
    if want == have:
        return
    same_shape = (spec.cpu.sockets, spec.cpu.threads) == (launched.cpu.sockets, launched.cpu.threads)
    if want > have and want <= limit and same_shape:
        work.step(s.AddCpus(name=work.name, count=want, summary=f"vCPUs: {have} -> {want} (device_add)"))
        work.changed("cpu.count", have, want, ("cpu", "cores"))
        return
    if want < have:
        why = "QEMU 7.2 cannot unplug vCPUs"
    elif not same_shape:
        why = "sockets and threads are fixed when QEMU starts"
    else:
        why = f"the VM was started with at most {limit} vCPUs (cpu.maxCpus)"
    work.restart_causes.append(f"vCPUs {have} -> {want}: {why}")
    work.fields.append(FieldChange(path="cpu.count", before=have, after=want, mode=Mode.RESTART, how=why))


def _memory(work: LivePlan, spec: VirtualMachineSpec, launched: VirtualMachineSpec, live: LiveState) -> None:
    want, capacity = spec.memory.size, live.memory
    balloon = launched.memory.balloon
    current = live.balloon_target if balloon and live.balloon_target is not None else capacity
    if want == current:
        return
    if want > capacity:
        limit = launched.memory.maxSize or launched.memory.size
        if want <= limit and live.dimms < launched.memory.slots:
            work.step(s.AddMemory(name=work.name, size=want - capacity,
                                  summary=f"memory: {format_size(capacity)} -> {format_size(want)} (pc-dimm of "
                                  f"{format_size(want - capacity)})"))
            work.changed("memory.size", format_size(current), format_size(want), ("memory", "size"), "pc-dimm")
            if balloon and live.balloon_target is not None:
                work.step(s.SetBalloon(name=work.name, size=want, summary=f"balloon: release to {format_size(want)}"))
            return
        why = (f"the VM was started with memory.maxSize {format_size(limit)}" if want > limit
               else "no DIMM slot left")
    elif balloon:
        work.step(s.SetBalloon(name=work.name, size=want,
                               summary=f"balloon: {format_size(current)} -> {format_size(want)}"))
        work.changed("memory.size", format_size(current), format_size(want), ("memory", "size"), "balloon")
        return
    else:
        why = "memory shrinks live only through a balloon (memory.balloon: true)"
    work.restart_causes.append(f"memory {format_size(current)} -> {format_size(want)}: {why}")
    work.fields.append(FieldChange(path="memory.size", before=format_size(current), after=format_size(want),
                                   mode=Mode.RESTART, how=why))
