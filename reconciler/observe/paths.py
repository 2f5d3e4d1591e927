"""Observe the host paths the host policy judges: every path a desired or recorded VM names (kernel,
initrd, disk and CD-ROM images, PCI option ROMs), every storage root and the state directory, each resolved
after symlinks; and, when a VM wants UEFI, the firmware directories and every OVMF file that may be in them.

Facts only (``ObservedState.paths``); the pure ``plan.policy`` decides what they allow.
"""

from __future__ import annotations

from collections.abc import Iterable

from reconciler.adapters.paths import policy_facts
from reconciler.plan.firmware import probe_paths
from reconciler.plan.observed import ObservedPath
from reconciler.plan.policy import manifest_paths
from reconciler.spec.host import HostConfig
from reconciler.spec.models import VirtualMachine


def observe_paths(vms: Iterable[VirtualMachine], host: HostConfig, state_dir: str) -> dict[str, ObservedPath]:
    vms = list(vms)
    named = {path for vm in vms for _, path in manifest_paths(vm.spec)}
    if any(vm.spec.firmware.type == "uefi" for vm in vms):  # which OVMF files exist: the firmware's facts
        named |= {*host.firmwareDirs, *probe_paths(host)}
    if any(device.romFile for vm in vms for device in vm.spec.hostDevices):
        named |= set(host.firmwareDirs)  # a PCI option ROM may come from the firmware directories too
    return policy_facts(host, state_dir, named)
