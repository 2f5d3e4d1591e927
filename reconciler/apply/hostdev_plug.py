"""Hot-plug and unplug passed-through host devices on a running VM over QMP.

Called by the executor for ``hotplug-host-device`` and ``unplug-host-device``, after the device was taken
for the VM (``apply/vfio.py``: the IOMMU group on vfio-pci, its node QEMU's user's). USB goes onto the xHCI
controller the VM was started with; PCI onto a free spare root port (``spec.hotplugSlots``). Like
``apply/hotplug.py``: each function does only what is missing and confirms the result; an unplug the guest
does not release stays pending (live.json) and the device is only given back to the host once it is gone.
"""

from __future__ import annotations

from reconciler.adapters.monitor import Monitor, peripheral_ids
from reconciler.apply.hotplug import DEVICE_TIMEOUT, PENDING, _confirm_present, _free_bus, _unplug
from reconciler.errors import StepFailed
from reconciler.qemu.hostdev import USB_CONTROLLER, usb_host_args, vfio_pci_args
from reconciler.spec.models import VirtualMachine
from reconciler.spec.naming import host_device
from reconciler.state.layout import VMPaths


async def hotplug_host_device(qmp: Monitor, vm: VirtualMachine, name: str) -> str:
    device = next((d for d in vm.spec.hostDevices if d.name == name), None)
    if device is None:
        raise StepFailed(f"hostDevices[{name}] is not in the VM's record")
    qemu_id = host_device(name)
    present = await peripheral_ids(qmp)
    if qemu_id in present:
        return "already plugged"
    if device.usb is not None:
        if USB_CONTROLLER not in present:
            raise StepFailed("the VM has no xHCI controller (it is added at start with the first USB device)")
        args = usb_host_args(device)
    else:
        args = vfio_pci_args(device, await _free_bus(qmp, vm))
    await qmp.execute("device_add", args, timeout=DEVICE_TIMEOUT)
    await _confirm_present(qmp, qemu_id)
    return f"plugged ({args['driver']})"


async def unplug_host_device(qmp: Monitor, paths: VMPaths, name: str) -> str:
    if not await _unplug(qmp, paths, host_device(name)):
        return PENDING
    return "unplugged"
