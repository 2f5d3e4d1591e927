"""``spec.hostDevices``: host PCI and USB devices passed through to a VM (seed §9), as frozen models (pure).

A PCI device is named by its full address (``0000:01:00.0``); a USB device by its vendor and product ids, by
its bus and port path (``bus: 1, port: "2.3"``) or by its bus and device address. Every value is validated
strictly here, once: addresses and ids by their exact formats, so nothing that reaches a QEMU option
(``host=``, ``vendorid=``, ``romfile=``) can carry ``,`` ``=`` or a control character. Whether the host has
the device and may give it is the host policy's and the planner's business (``plan/hostdev.py``), not this
module's. Used by ``spec.models.VirtualMachineSpec`` and by the argv builder, planner and executor.
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$")
_HEX_ID = re.compile(r"^(0x)?[0-9a-fA-F]{4}$")
_PORT_PATH = re.compile(r"^[1-9][0-9]?(\.[1-9][0-9]?){0,6}$")
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._+@/-]*$")


def _pci_address(value: str) -> str:
    """A full PCI address, domain included, as sysfs spells it (lower case): ``0000:01:00.0``."""
    if not PCI_ADDRESS.fullmatch(value.lower()):
        raise ValueError(f"{value!r}: expected a PCI address like 0000:01:00.0 (domain:bus:slot.function, hex)")
    return value.lower()


def _hex_id(value: str) -> str:
    """A 16-bit USB id, written ``0x1050`` or ``1050``; kept as ``0x`` + four lower-case hex digits."""
    if not _HEX_ID.fullmatch(value):
        raise ValueError(f"{value!r}: expected a 16-bit hex id like 0x1050")
    return "0x" + value.lower().removeprefix("0x")


def _port_path(value: str) -> str:
    if not _PORT_PATH.fullmatch(value):
        raise ValueError(f"{value!r}: expected a USB port path like 2 or 1.4 (ports separated by '.')")
    return value


def _rom_path(value: str) -> str:
    """An absolute, normalised path made only of plain characters (it reaches ``romfile=``)."""
    if not _SAFE_PATH.fullmatch(value) or ".." in value.split("/"):
        raise ValueError("must be an absolute path of letters, digits and . _ + @ - / (no '..', ',' or '=')")
    return posixpath.normpath(value)


PciAddress = Annotated[str, AfterValidator(_pci_address)]
UsbId = Annotated[str, AfterValidator(_hex_id)]
UsbPortPath = Annotated[str, AfterValidator(_port_path)]
HostDeviceName = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=False, validate_default=True)


class UsbSelector(_Frozen):
    """Which host USB device: ``vendor`` + ``product``; or ``bus`` + ``port``; or ``bus`` + ``address``."""

    vendor: UsbId | None = Field(default=None, description="idVendor, e.g. 0x1050.")
    product: UsbId | None = Field(default=None, description="idProduct, e.g. 0x0407.")
    bus: Annotated[int, Field(ge=1, le=255)] | None = Field(default=None, description="The host bus number.")
    port: UsbPortPath | None = Field(default=None, description="The port path on that bus, e.g. 1.4.")
    address: Annotated[int, Field(ge=1, le=127)] | None = Field(
        default=None, description="The device address on that bus (changes when it is re-plugged).")

    @model_validator(mode="after")
    def _one_way(self) -> UsbSelector:
        by_id = self.vendor is not None or self.product is not None
        by_place = self.port is not None or self.address is not None
        if by_id and (self.vendor is None or self.product is None):
            raise ValueError("usb: vendor and product go together")
        if by_id == (by_place or self.bus is not None):
            raise ValueError("usb: give either vendor + product, or bus + port, or bus + address")
        if not by_id and (self.bus is None or (self.port is None) == (self.address is None)):
            raise ValueError("usb: bus goes with exactly one of port or address")
        return self

    def label(self) -> str:
        if self.vendor is not None:
            return f"{self.vendor[2:]}:{(self.product or '')[2:]}"
        return f"bus {self.bus} port {self.port}" if self.port else f"bus {self.bus} address {self.address}"


class HostDeviceSpec(_Frozen):
    name: HostDeviceName = Field(description="The device's name in this VM (its QEMU id is hostdev-NAME).")
    pci: PciAddress | None = Field(default=None, description="A host PCI function, e.g. 0000:01:00.0: bound to "
                                   "vfio-pci (with its whole IOMMU group) while the VM has it.")
    usb: UsbSelector | None = Field(default=None, description="A host USB device (usb-host on an xHCI controller).")
    romFile: Annotated[str, AfterValidator(_rom_path)] | None = Field(
        default=None, description="A PCI option ROM file (romfile=), inside the host's firmwareDirs or storage "
        "roots.")
    multifunction: bool = Field(default=False, description="PCI: multifunction=on (function 0 of a device whose "
                                "other functions are passed too).")

    @model_validator(mode="after")
    def _pci_or_usb(self) -> HostDeviceSpec:
        if (self.pci is None) == (self.usb is None):
            raise ValueError("a host device is either pci or usb (exactly one)")
        if self.usb is not None and (self.romFile is not None or self.multifunction):
            raise ValueError("romFile and multifunction are for PCI devices")
        return self

    def label(self) -> str:
        """How messages name it: ``hostDevices[gpu] (PCI 0000:01:00.0)``."""
        what = f"PCI {self.pci}" if self.pci else f"USB {self.usb.label() if self.usb else ''}"
        return f"spec.hostDevices[{self.name}] ({what})"


def unique_host_devices(devices: list[HostDeviceSpec]) -> None:
    """Names and PCI addresses are unique within a VM. :raise ValueError: Naming the duplicate."""
    names: set[str] = set()
    addresses: set[str] = set()
    usb: set[UsbSelector] = set()
    for device in devices:
        if device.name in names:
            raise ValueError(f"hostDevices: the name {device.name!r} is used twice")
        names.add(device.name)
        if device.pci is not None:
            if device.pci in addresses:
                raise ValueError(f"hostDevices: the PCI device {device.pci} is listed twice")
            addresses.add(device.pci)
        if device.usb is not None:
            if device.usb in usb:
                raise ValueError(f"hostDevices: the USB device {device.usb.label()} is listed twice")
            usb.add(device.usb)
