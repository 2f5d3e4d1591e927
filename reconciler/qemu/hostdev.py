"""QEMU device options for passed-through host devices (pure): ``vfio-pci`` and ``usb-host`` on ``qemu-xhci``.

Used by the argv builder (cold-plug at start: ``-device`` JSON) and by ``apply/hotplug.py`` (the same
dictionaries as ``device_add`` arguments), so a device plugged live is the device a restart would create.
Every value comes from ``spec.hostdev``'s strict formats (PCI address, hex ids, plain paths); they are
checked once more here, since they reach QEMU.
"""

from __future__ import annotations

from typing import Any

from reconciler.errors import UnsafeValue
from reconciler.spec.hostdev import PCI_ADDRESS, HostDeviceSpec
from reconciler.spec.models import VirtualMachineSpec
from reconciler.spec.naming import host_device

USB_CONTROLLER = "xhci0"


class UnsafeHostDevice(UnsafeValue):
    """A host device value that does not have its strict format (never reached from a validated spec)."""


def needs_xhci(spec: VirtualMachineSpec) -> bool:
    """An xHCI controller is added when (and only when) the VM passes a USB device through."""
    return any(device.usb is not None for device in spec.hostDevices)


def xhci_args() -> dict[str, Any]:
    return {"driver": "qemu-xhci", "id": USB_CONTROLLER}


def vfio_pci_args(device: HostDeviceSpec, bus: str | None) -> dict[str, Any]:
    """``vfio-pci`` for a PCI function: on its own root port (``bus``), with its ROM and multifunction."""
    if device.pci is None or not PCI_ADDRESS.fullmatch(device.pci):
        raise UnsafeHostDevice(f"hostDevices[{device.name}]: not a PCI address: {device.pci!r}")
    args: dict[str, Any] = {"driver": "vfio-pci", "host": device.pci, "id": host_device(device.name)}
    if bus is not None:
        args["bus"] = bus
    if device.romFile is not None:
        if "," in device.romFile or "=" in device.romFile:
            raise UnsafeHostDevice(f"hostDevices[{device.name}]: unsafe romFile {device.romFile!r}")
        args["romfile"] = device.romFile
    if device.multifunction:
        args["multifunction"] = "on"
    return args


def usb_host_args(device: HostDeviceSpec) -> dict[str, Any]:
    """``usb-host`` on the xHCI controller, selecting the device as the manifest does (QEMU re-finds it by
    vendor:product or by port after a re-plug; a bus address changes on every re-plug)."""
    usb = device.usb
    if usb is None:
        raise UnsafeHostDevice(f"hostDevices[{device.name}]: not a USB device")
    args: dict[str, Any] = {"driver": "usb-host", "id": host_device(device.name), "bus": f"{USB_CONTROLLER}.0"}
    if usb.vendor is not None and usb.product is not None:
        args.update(vendorid=int(usb.vendor, 16), productid=int(usb.product, 16))
    elif usb.port is not None:
        args.update(hostbus=usb.bus, hostport=usb.port)
    else:
        args.update(hostbus=usb.bus, hostaddr=usb.address)
    return args
