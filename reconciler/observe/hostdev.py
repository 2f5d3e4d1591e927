"""Observe the host devices VMs ask for (``spec.hostDevices``) and those we hold (``hostdevs.json``).

Called by ``observe.snapshot.observe``. Read-only: sysfs under ``HostConfig.sysfsRoot`` through
``adapters/sysfs.py``, and the claims file through ``state.files``. Nothing is read when no VM names a host
device and we hold none (the common case costs nothing).
"""

from __future__ import annotations

from collections.abc import Iterable

from reconciler.adapters import sysfs
from reconciler.plan.hostdev_facts import ObservedHostDevices
from reconciler.spec.host import HostConfig
from reconciler.spec.models import VirtualMachine
from reconciler.state import files
from reconciler.state.layout import StateLayout


def observe_host_devices(layout: StateLayout, vms: Iterable[VirtualMachine], host: HostConfig) -> ObservedHostDevices:
    claims = files.read_host_device_claims(layout)
    devices = [device for vm in vms for device in vm.spec.hostDevices]
    addresses = {device.pci for device in devices if device.pci}
    addresses |= {key for key in claims if not key.startswith("usb:")}
    with_usb = any(device.usb for device in devices) or any(key.startswith("usb:") for key in claims)
    if not addresses and not with_usb:
        return ObservedHostDevices(claims=claims)
    found = sysfs.observe_devices(host.sysfsRoot, host.devRoot, addresses, with_usb)
    return found.model_copy(update={"claims": claims})
