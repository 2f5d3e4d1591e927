"""Host device passthrough (``spec.hostDevices``): the plan-time host checks and the take/give-back steps.

Pure: judges the sysfs facts (``ObservedState.devices``) and the claims we hold (``hostdevs.json``), and is
called by ``plan.planner`` for each VM. The rule for a PCI function (libvirt's ``managed='yes'``, made
explicit and stricter, since manifests are untrusted):

- the host policy lists it in ``pciPassthrough``, it exists, the IOMMU is on and it has an IOMMU group, and
  vfio-pci is loaded;
- every member of its IOMMU group other than a PCI bridge (bridges keep ``pcieport``; the kernel accepts
  that) is in ``pciPassthrough`` too, and is bound to vfio-pci or to no driver, or to a driver the host
  policy lets us unbind (``vfioUnbindDrivers``) while the host does not use it (no network interface or
  block device under it). Any other member is *in use by the host*: refused, naming it;
- no member is held by another VM (``hostdevs.json``) or asked for by another VM's manifest;
- its ``romFile`` passes the host policy (``plan/policy.py``) with the firmware directories and storage roots
  as roots.

A USB device: listed in ``usbPassthrough`` (vendor:product), found exactly once, not held or asked for by
another VM. The whole group is taken (bound to vfio-pci) when the VM is about to run with the device, and
given back (to each member's recorded driver) once the VM's QEMU will not have it: stopped, deleted, or
restarted without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.plan import steps as s
from reconciler.plan.hostdev_facts import VFIO_DRIVER, ObservedHostDevices, UsbDevice
from reconciler.plan.observed import ObservedState
from reconciler.spec.host import HostConfig
from reconciler.spec.hostdev import HostDeviceSpec, UsbSelector
from reconciler.spec.models import VirtualMachine, VirtualMachineSpec


def usb_matches(selector: UsbSelector, found: list[UsbDevice]) -> list[UsbDevice]:
    """The host's USB devices the selector names."""
    if selector.vendor is not None:
        return [d for d in found if (d.vendor, d.product) == (selector.vendor, selector.product)]
    if selector.port is not None:
        return [d for d in found if (d.bus, d.port) == (selector.bus, selector.port)]
    return [d for d in found if (d.bus, d.address) == (selector.bus, selector.address)]


def device_keys(device: HostDeviceSpec, facts: ObservedHostDevices) -> list[str]:
    """The claim keys taking this device means: each non-bridge member of a PCI function's group, or the
    USB device's ``usb:BUS-PORT`` (none when it is not found exactly once)."""
    if device.pci is not None:
        return [m for m in facts.members(device.pci) if not (m in facts.pci and facts.pci[m].bridge)]
    matches = usb_matches(device.usb, facts.usb) if device.usb else []
    return [matches[0].key] if len(matches) == 1 else []


def _wanted_elsewhere(name: str, desired: Mapping[str, VirtualMachine], facts: ObservedHostDevices) -> dict[str, str]:
    """Keys other desired VMs' manifests ask for -> 'VM other's spec.hostDevices[x]'."""
    wanted: dict[str, str] = {}
    for other in sorted(desired):
        if other == name:
            continue
        for device in desired[other].spec.hostDevices:
            for key in device_keys(device, facts):
                wanted.setdefault(key, f"VM {other}'s spec.hostDevices[{device.name}]")
    return wanted


@dataclass
class Check:
    name: str
    facts: ObservedHostDevices
    host: HostConfig
    elsewhere: dict[str, str]
    refusals: list[str] = field(default_factory=list)

    def conflicts(self, label: str, named: dict[str, str]) -> None:
        """One refusal per other VM holding (or, when nobody holds them, asking for) any of ``named``
        (key -> how to name it). What this VM holds is its own: another manifest asking for it is refused,
        never the holder."""
        found: dict[str, list[str]] = {}
        for key, what in named.items():
            claim = self.facts.claims.get(key)
            if claim is not None and claim.vm != self.name:
                who = (f"held by VM {claim.vm} (its hostDevices[{claim.device}]); it is given back when that VM "
                       "stops or no longer asks for it")
            elif claim is None and key in self.elsewhere:
                who = f"also asked for by {self.elsewhere[key]}"
            else:
                continue
            found.setdefault(who, []).append(what)
        for who, whats in found.items():
            self.refusals.append(f"{label}: {' and '.join(whats)} {'is' if len(whats) == 1 else 'are'} {who}")


def member_refusal(check: Check, label: str, member: str) -> str | None:
    """Why this member of a passed-through function's IOMMU group cannot be taken (None: it can). Also the
    executor's re-check right before it unbinds anything (``apply/vfio.py``)."""
    function = check.facts.pci.get(member)
    if function is None or not function.exists:
        return f"{label}: IOMMU group member {member} was not found in sysfs"
    if function.bridge:
        return None
    if member not in check.host.pciPassthrough:
        return (f"{label}: IOMMU group member {member} is not in the host policy's pciPassthrough "
                f"({', '.join(check.host.pciPassthrough) or 'empty'}); the whole group goes to the VM")
    if function.driver in (None, VFIO_DRIVER):
        return None
    if function.host_uses:
        return (f"{label}: IOMMU group member {member} is bound to {function.driver} and in use by the host "
                f"({', '.join(function.host_uses)})")
    if function.driver not in check.host.vfioUnbindDrivers:
        return (f"{label}: IOMMU group member {member} is bound to the host driver {function.driver}, which the "
                f"host policy does not let us unbind (vfioUnbindDrivers: {', '.join(check.host.vfioUnbindDrivers)})")
    return None


def _check_pci(check: Check, device: HostDeviceSpec, address: str) -> None:
    label, facts, host = device.label(), check.facts, check.host
    function = facts.pci.get(address)
    if address not in host.pciPassthrough:
        check.refusals.append(f"{label}: not in the host policy's pciPassthrough "
                              f"({', '.join(host.pciPassthrough) or 'empty'})")
    elif function is None or not function.exists:
        check.refusals.append(f"{label}: no such PCI device on this host ({host.sysfsRoot}/bus/pci/devices/{address})")
    elif not facts.iommu:
        check.refusals.append(f"{label}: the IOMMU is off ({host.sysfsRoot}/kernel/iommu_groups is empty): enable "
                              "it in the firmware and on the kernel command line (intel_iommu=on or amd_iommu=on)")
    elif function.iommu_group is None:
        check.refusals.append(f"{label}: the device has no IOMMU group ({host.sysfsRoot}/bus/pci/devices/{address}"
                              "/iommu_group is missing)")
    elif not facts.vfio_driver:
        check.refusals.append(f"{label}: the vfio-pci driver is not loaded (modprobe vfio-pci)")
    else:
        for member in facts.members(address):
            if reason := member_refusal(check, label, member):
                check.refusals.append(reason)
        check.conflicts(label, {member: f"IOMMU group member {member}" if member != address else "the device"
                                for member in facts.members(address)})


def _check_usb(check: Check, device: HostDeviceSpec, selector: UsbSelector) -> None:
    label = device.label()
    matches = usb_matches(selector, check.facts.usb)
    if not matches:
        check.refusals.append(f"{label}: no such USB device on this host ({check.host.sysfsRoot}/bus/usb/devices)")
        return
    if len(matches) > 1:
        where = ", ".join(f"bus {d.bus} port {d.port}" for d in matches)
        check.refusals.append(f"{label}: {len(matches)} devices match ({where}); name one by bus and port")
        return
    found = matches[0]
    ids = f"{found.vendor[2:]}:{found.product[2:]}"
    if ids not in check.host.usbPassthrough:
        check.refusals.append(f"{label}: {ids} is not in the host policy's usbPassthrough "
                              f"({', '.join(check.host.usbPassthrough) or 'empty'})")
    check.conflicts(label, {found.key: f"the USB device at bus {found.bus} port {found.port}"})


def refusals(name: str, spec: VirtualMachineSpec, observed: ObservedState, host: HostConfig,
             desired: Mapping[str, VirtualMachine]) -> list[str]:
    """Every reason this host cannot give the VM its host devices (empty: it can)."""
    if not spec.hostDevices:
        return []
    check = Check(name, observed.devices, host, _wanted_elsewhere(name, desired, observed.devices))
    for device in spec.hostDevices:
        if device.pci is not None:
            _check_pci(check, device, device.pci)
        elif device.usb is not None:
            _check_usb(check, device, device.usb)
    return check.refusals


def _ready(name: str, device: HostDeviceSpec, facts: ObservedHostDevices, qemu_uid: int | None) -> bool:
    """Taken already: every key claimed for this VM, PCI members bound to vfio-pci, nodes QEMU's user's."""
    keys = device_keys(device, facts)
    if not keys or any((claim := facts.claims.get(key)) is None or claim.vm != name for key in keys):
        return False
    if device.pci is not None:
        function = facts.pci.get(device.pci)
        group = function.iommu_group if function else None
        bound = all(facts.pci[key].driver == VFIO_DRIVER for key in keys if key in facts.pci)
        return bound and group is not None and qemu_uid is not None and facts.group_nodes.get(group) == qemu_uid
    found = usb_matches(device.usb, facts.usb) if device.usb else []
    return len(found) == 1 and found[0].node_uid == qemu_uid and qemu_uid is not None


def _prepare(name: str, device: HostDeviceSpec, facts: ObservedHostDevices) -> s.PrepareHostDevice:
    if device.pci is not None:
        members = device_keys(device, facts)
        function = facts.pci.get(device.pci)
        others = [m for m in members if m != device.pci]
        also = f" with its IOMMU group's {', '.join(others)}" if others else ""
        return s.PrepareHostDevice(
            name=name, target=device.name, bus="pci", address=device.pci, members=members,
            group=function.iommu_group if function else None,
            summary=f"hostDevices[{device.name}]: bind {device.pci}{also} to vfio-pci (drivers recorded first), "
            "give /dev/vfio/GROUP to QEMU's user")
    found = usb_matches(device.usb, facts.usb)[0] if device.usb else None
    key, node = (found.key, found.node) if found else ("", None)
    return s.PrepareHostDevice(name=name, target=device.name, bus="usb", address=key, node=node,
                               summary=f"hostDevices[{device.name}]: give the USB device {node} to QEMU's user")


def steps(name: str, devices: list[HostDeviceSpec], keep: set[str], observed: ObservedState
          ) -> tuple[list[s.Step], list[str]]:
    """Take the ``devices`` the VM's QEMU has once the plan ran and that are not taken yet; give back what
    this VM holds for a device neither in them nor in ``keep`` (names still plugged: an unplug pending).
    Returns (steps, reasons)."""
    facts = observed.devices
    found: list[s.Step] = []
    reasons: list[str] = []
    taking: set[str] = set()
    for device in devices:
        keys = set(device_keys(device, facts))
        if keys and keys <= taking and device.pci is not None:
            continue  # another function of the same IOMMU group takes the whole group in this plan
        if not _ready(name, device, facts, observed.host.qemu_uid):
            found.append(_prepare(name, device, facts))
            taking |= keys
    wanted = {key for device in devices for key in device_keys(device, facts)}
    held: dict[str, list[str]] = {}
    for key, claim in sorted(facts.claims.items()):
        if claim.vm == name and key not in wanted and claim.device not in keep:
            held.setdefault(claim.device, []).append(key)
    for device_name, held_keys in sorted(held.items()):
        found.append(s.ReleaseHostDevice(
            name=name, target=device_name, keys=held_keys,
            summary=f"hostDevices[{device_name}]: give {', '.join(held_keys)} back to the host (recorded drivers, "
            "device node owners)"))
        reasons.append(f"hostDevices[{device_name}]: held for the VM, whose QEMU will not have it")
    return found, reasons
