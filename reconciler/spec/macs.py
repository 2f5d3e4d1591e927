"""Default MAC addresses: derived from the names, unique on the host, and never changed once a VM has one.

A NIC without ``mac`` gets ``5a:XX:XX:XX:XX:XX``: the first octet 0x5a is locally administered (bit 1)
and unicast (bit 0 clear), and is not QEMU's 52:54:00 (which left 24 bits: 10,000 VMs gave 4
collisions); the other 40 bits are the first 5 bytes of ``sha256("VM/NIC")``. At 10,000 NICs a
collision has odds of about 1 in 20,000, and when one happens it is resolved here, not reported as an
error: NICs are taken in order (NICs whose VM was applied before keep what they have; new ones by VM
name, then NIC order), and a NIC whose address is already taken derives again from ``"VM/NIC#1"``,
``#2``... Which NIC is bumped never depends on which file was read first.

Once a VM is applied its record holds the address (the planner writes the record with these resolved
MACs), so an address, once assigned, stays: a VM added later can never take it over. Records written
before this scheme hold no MAC for such NICs: those VMs were started with the 52:54:00 address derived
from 24 bits (``legacy_mac``), and they keep it (a guest's network configuration often names its MAC).

Pure; called by the CLI's ``read_view`` and the sync daemon's snapshot, right before planning, on the
desired VMs and on the last-applied ones (``resolve``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

from reconciler.spec.models import NetworkInterfaceSpec, VirtualMachine, default_mac

Key = tuple[str, str]  # (VM, NIC)


def legacy_mac(vm_name: str, nic_name: str) -> str:
    """The address NICs without ``mac`` had before: QEMU's 52:54:00 and 24 bits of the same hash."""
    digest = hashlib.sha256(f"{vm_name}/{nic_name}".encode()).digest()
    return "52:54:00:{:02x}:{:02x}:{:02x}".format(*digest[:3])


def _with_macs(vm: VirtualMachine, mac_of: Callable[[NetworkInterfaceSpec], str]) -> VirtualMachine:
    if all(nic.mac is not None for nic in vm.spec.networks):
        return vm
    nics = [nic if nic.mac is not None else nic.model_copy(update={"mac": mac_of(nic)}) for nic in vm.spec.networks]
    return vm.model_copy(update={"spec": vm.spec.model_copy(update={"networks": nics})})


def resolve_recorded(recorded: Mapping[str, VirtualMachine]) -> dict[str, VirtualMachine]:
    """Last-applied VMs with every NIC's address: a NIC recorded without one had the legacy address."""
    return {name: _with_macs(vm, lambda nic, name=name: legacy_mac(name, nic.name))  # type: ignore[misc]
            for name, vm in recorded.items()}


def resolve(desired: Mapping[str, VirtualMachine], recorded: Mapping[str, VirtualMachine]
            ) -> tuple[dict[str, VirtualMachine], dict[str, VirtualMachine]]:
    """``desired`` and ``recorded`` with an address on every NIC (see the module's docstring).

    ``recorded`` should hold every VM of the state directory (even those not desired: their addresses
    stay taken while they exist).
    """
    old = resolve_recorded(recorded)
    taken: dict[str, Key] = {}
    for name, vm in old.items():
        for nic in vm.spec.networks:
            taken.setdefault(str(nic.mac), (name, nic.name))
    for name, vm in desired.items():
        for nic in vm.spec.networks:
            if nic.mac is not None:
                taken[nic.mac] = (name, nic.name)
    kept = {name: {nic.name: str(nic.mac) for nic in vm.spec.networks} for name, vm in old.items()}

    def assign(name: str, nic: NetworkInterfaceSpec) -> str:
        if (recorded_mac := kept.get(name, {}).get(nic.name)) is not None:
            return recorded_mac
        attempt = 0
        while (mac := default_mac(name, nic.name, attempt)) in taken and taken[mac] != (name, nic.name):
            attempt += 1
        taken[mac] = (name, nic.name)
        return mac

    # Applied VMs first (they keep theirs, and only claim what they had), then new ones by name.
    order = sorted(desired, key=lambda name: (name not in old, name))
    return {name: _with_macs(desired[name], lambda nic, name=name: assign(name, nic))  # type: ignore[misc]
            for name in order}, old
