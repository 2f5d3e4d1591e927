"""Take host devices for a VM and give them back: PCI functions to and from vfio-pci, device node owners.

Driven by the executor's ``prepare-host-device`` and ``release-host-device`` steps. Binding follows the
kernel's driver_override protocol (libvirt's ``virPCIDeviceBindToStub``): write ``vfio-pci`` to the
function's ``driver_override``, write its address to its current driver's ``unbind``, then to
``bus/pci/drivers_probe``; giving it back clears ``driver_override``, unbinds it from vfio-pci and probes
again, so the kernel gives it to its own driver. Each step waits for sysfs to show the result (with a
deadline) rather than trusting the write.

Crash safety: the claim (``hostdevs.json``: the VM, and the member's driver and the node's owner *before*)
is written before the host is touched and dropped only once the device is back, so a crash in between
leaves a claim the next plan finishes (the VM still wants it) or releases (to the recorded driver). Every
operation is idempotent. QEMU runs unprivileged and opens ``/dev/vfio/GROUP`` itself (QEMU 7.2's vfio-pci
has no fd property), so the group's node is given to QEMU's user (0600) while the VM holds it, and its owner
and mode are restored when the last member is given back; a USB device's ``/dev/bus/usb/BBB/DDD`` likewise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from reconciler.adapters import sysfs
from reconciler.errors import Refused, StepFailed
from reconciler.plan import hostdev
from reconciler.plan.hostdev_facts import VFIO_DRIVER
from reconciler.spec.host import HostConfig
from reconciler.state import files
from reconciler.state.layout import StateLayout
from reconciler.state.models import HostDeviceClaim, NodeOwner

DEADLINE = 5.0  # seconds for sysfs to show a bind or unbind (the kernel does it before write() returns)


def _write(path: Path, value: str) -> None:
    """Write one sysfs attribute (never create one: a missing attribute is an error)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW)  # O_TRUNC: sysfs ignores it
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _wait(what: str, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not done():
        if time.monotonic() > deadline:
            raise StepFailed(f"{what} (still not so after {DEADLINE:.0f}s)")
        time.sleep(0.02)


def bind_vfio(root: str, address: str) -> str:
    """Bind one function to vfio-pci (idempotent); what was done."""
    before = sysfs.driver_of(root, address)
    if before == VFIO_DRIVER:
        return f"{address} already on vfio-pci"
    device = sysfs.pci_dir(root, address)
    _write(device / "driver_override", VFIO_DRIVER)
    if before is not None:
        _write(device / "driver" / "unbind", address)
        _wait(f"{address} did not leave {before}", lambda: sysfs.driver_of(root, address) is None)
    _write(Path(root) / "bus/pci/drivers_probe", address)
    _wait(f"{address} was not bound to vfio-pci", lambda: sysfs.driver_of(root, address) == VFIO_DRIVER)
    return f"{address} {before or 'no driver'} -> vfio-pci"


def unbind_vfio(root: str, address: str, original: str | None) -> str:
    """Give one function back to ``original`` (None: leave it with no driver); idempotent."""
    if original == VFIO_DRIVER:
        return f"{address} stays on vfio-pci (it was there before)"
    device = sysfs.pci_dir(root, address)
    if not device.is_dir():
        return f"{address} is gone from the host"
    _write(device / "driver_override", "\n")  # an empty override: the kernel matches drivers again
    now = sysfs.driver_of(root, address)
    if now == original:
        return f"{address} already on {original or 'no driver'}"
    if now is not None:
        _write(device / "driver" / "unbind", address)
        _wait(f"{address} did not leave {now}", lambda: sysfs.driver_of(root, address) is None)
    if original is None:
        return f"{address} {now} -> no driver"
    _write(Path(root) / "bus/pci/drivers_probe", address)
    _wait(f"{address} did not come back to {original}", lambda: sysfs.driver_of(root, address) == original)
    return f"{address} {now or 'no driver'} -> {original}"


def _node_owner(path: str) -> NodeOwner:
    info = os.stat(path, follow_symlinks=False)
    return NodeOwner(path=path, uid=info.st_uid, gid=info.st_gid, mode=info.st_mode & 0o7777)


def _give_node(path: str, uid: int, gid: int) -> None:
    os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(path, 0o600)


def _restore_node(owner: NodeOwner) -> None:
    if os.path.lexists(owner.path):  # an unbound VFIO group's node goes away by itself
        os.chown(owner.path, owner.uid, owner.gid, follow_symlinks=False)
        os.chmod(owner.path, owner.mode)


def _group_now(root: str, device: str, address: str, members: list[str], group: str | None) -> tuple[str, list[str]]:
    """The function's IOMMU group and its non-bridge members as sysfs says now; the plan's, or StepFailed."""
    function = sysfs.pci_function(root, address)
    if not function.exists or function.iommu_group is None or function.iommu_group != group:
        raise StepFailed(f"hostDevices[{device}]: {address} is no longer in IOMMU group {group}: re-plan")
    now = [m for m in sysfs.group_members(root, group) if not sysfs.pci_function(root, m).bridge]
    if sorted(now) != sorted(members):
        raise StepFailed(f"hostDevices[{device}]: IOMMU group {group} is now {', '.join(now)}, not what was "
                         "planned: re-plan")
    return group, now


def take_pci(layout: StateLayout, host: HostConfig, vm: str, device: str, address: str, planned: list[str],
             group: str | None, account: tuple[int, int]) -> str:
    """Bind every member of the group to vfio-pci for ``vm`` and give /dev/vfio/GROUP to QEMU's user. The
    group and its members are read again from sysfs (a saved plan only says what was expected)."""
    root = host.sysfsRoot
    group, members = _group_now(root, device, address, planned, group)
    facts = sysfs.observe_devices(root, host.devRoot, set(members), with_usb=False)
    claims = files.read_host_device_claims(layout)
    check = hostdev.Check(vm, facts.model_copy(update={"claims": claims}), host, {})
    done = []
    for member in members:
        claim = claims.get(member)
        if claim is not None and claim.vm != vm:
            raise Refused(f"hostDevices[{device}]: {member} is held by VM {claim.vm}")
        if claim is None:
            if reason := hostdev.member_refusal(check, f"hostDevices[{device}]", member):
                raise Refused(f"host policy: {reason}")
            claim = HostDeviceClaim(vm=vm, device=device, original_driver=facts.pci[member].driver, group=group)
            files.write_host_device_claim(layout, member, claim)
        done.append(bind_vfio(root, member))
    done.append(_take_node(layout, members, sysfs.vfio_node(host.devRoot, group), account))
    return "; ".join(done)


def _take_node(layout: StateLayout, keys: list[str], node: str, account: tuple[int, int]) -> str:
    """Record the node's owner (once: a re-run keeps the first) on the first key's claim, then give it."""
    _wait(f"{node} did not appear", lambda: os.path.exists(node))
    claims = files.read_host_device_claims(layout)
    if not any(claims[key].node for key in keys if key in claims):
        files.write_host_device_claim(layout, keys[0], claims[keys[0]].model_copy(update={"node": _node_owner(node)}))
    _give_node(node, *account)
    return f"{node} -> uid {account[0]}"


def take_usb(layout: StateLayout, host: HostConfig, vm: str, device: str, key: str, account: tuple[int, int]) -> str:
    """Give the USB device's node (found again in sysfs by its bus and port) to QEMU's user."""
    found = [d for d in sysfs.usb_devices(host.sysfsRoot, host.devRoot) if d.key == key]
    node = found[0].node if found else None
    if node is None or not os.path.exists(node):
        raise StepFailed(f"hostDevices[{device}]: the USB device {key} is gone (unplugged?): re-plan")
    claim = files.read_host_device_claims(layout).get(key)
    if claim is not None and claim.vm != vm:
        raise Refused(f"hostDevices[{device}]: {key} is held by VM {claim.vm}")
    if claim is None:
        files.write_host_device_claim(layout, key, HostDeviceClaim(vm=vm, device=device))
    return _take_node(layout, [key], node, account)


def release(layout: StateLayout, host: HostConfig, vm: str, keys: list[str]) -> str:
    """Give the claimed devices back: node owners first (an unbound group's node disappears), then drivers;
    each claim dropped once its device is back."""
    claims = files.read_host_device_claims(layout)
    mine = {key: claims[key] for key in keys if key in claims and claims[key].vm == vm}
    done = []
    for claim in mine.values():
        others = [k for k, c in claims.items() if k not in mine and c.group is not None and c.group == claim.group]
        if claim.node is not None and not others:
            _restore_node(claim.node)
            done.append(f"{claim.node.path} owner restored")
    for key, claim in mine.items():
        if not key.startswith("usb:"):
            done.append(unbind_vfio(host.sysfsRoot, key, claim.original_driver))
        files.write_host_device_claim(layout, key, None)
    return "; ".join(done) or "nothing held"
