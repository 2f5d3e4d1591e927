"""Read host devices from sysfs: PCI functions, their IOMMU groups and drivers, USB devices, device nodes.

The one place that knows sysfs's layout (``<root>/bus/pci/devices/ADDR/{driver,iommu_group,class,...}``,
``<root>/kernel/iommu_groups/N/devices/``, ``<root>/bus/usb/devices/B-P/{busnum,devnum,idVendor,...}``).
``root`` is ``HostConfig.sysfsRoot`` (``/sys``; tests point it at a fake tree they build) and device nodes
live under ``HostConfig.devRoot``. Read-only: used by the observer (``observe/hostdev.py``) and by the
executor's binding code (``apply/vfio.py``) to re-check and to wait for the kernel.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from reconciler.plan.hostdev_facts import ObservedHostDevices, PciFunction, UsbDevice

_USB_DEVICE = re.compile(r"^([1-9][0-9]*)-([0-9.]+)$")
_MAX_DEPTH = 8  # a block device sits a few levels under its controller (ata1/host0/target0:0:0/0:0:0:0/block)


def pci_dir(root: str, address: str) -> Path:
    return Path(root) / "bus/pci/devices" / address


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _link_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def driver_of(root: str, address: str) -> str | None:
    """The driver the function is bound to now (None: none)."""
    return _link_name(pci_dir(root, address) / "driver")


def iommu_on(root: str) -> bool:
    try:
        with os.scandir(Path(root) / "kernel/iommu_groups") as entries:
            return any(entries)
    except OSError:
        return False


def vfio_loaded(root: str) -> bool:
    return (Path(root) / "bus/pci/drivers/vfio-pci").is_dir()


def group_members(root: str, group: str) -> list[str]:
    try:
        with os.scandir(Path(root) / "kernel/iommu_groups" / group / "devices") as entries:
            return sorted(entry.name for entry in entries)
    except OSError:
        return []


def _host_uses(device: Path) -> list[str]:
    """Network interfaces and block devices under the function: the host uses it for them."""
    uses: list[str] = []
    base = len(device.parts)
    for top, dirs, _ in os.walk(device):  # symlinks (subsystem, driver, ...) are not followed
        here = Path(top)
        if len(here.parts) - base >= _MAX_DEPTH:
            dirs.clear()
        if here.name == "net":
            uses += [f"network interface {name}" for name in sorted(dirs)]
        elif here.name == "block":
            uses += [f"block device {name}" for name in sorted(dirs)]
        else:
            continue
        dirs.clear()
    return sorted(uses)


def pci_function(root: str, address: str) -> PciFunction:
    device = pci_dir(root, address)
    if not device.is_dir():
        return PciFunction(address=address, exists=False)
    return PciFunction(address=address, exists=True, driver=driver_of(root, address),
                       class_code=_read(device / "class"), vendor=_read(device / "vendor"),
                       device=_read(device / "device"), iommu_group=_link_name(device / "iommu_group"),
                       host_uses=_host_uses(device))


def node_uid(path: str) -> int | None:
    try:
        return os.stat(path, follow_symlinks=False).st_uid
    except OSError:
        return None


def vfio_node(dev_root: str, group: str) -> str:
    return str(Path(dev_root) / "vfio" / group)


def usb_devices(root: str, dev_root: str) -> list[UsbDevice]:
    """Every USB device (not interface) sysfs lists, with its node under ``dev_root``."""
    found = []
    try:
        with os.scandir(Path(root) / "bus/usb/devices") as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError:
        return []
    for entry in entries:
        match = _USB_DEVICE.fullmatch(entry.name)
        here = Path(entry.path)
        bus, address = _read(here / "busnum"), _read(here / "devnum")
        vendor, product = _read(here / "idVendor").lower(), _read(here / "idProduct").lower()
        if not match or not bus.isdigit() or not address.isdigit() or len(vendor) != 4 or len(product) != 4:
            continue
        node = str(Path(dev_root) / "bus/usb" / f"{int(bus):03d}" / f"{int(address):03d}")
        found.append(UsbDevice(bus=int(bus), address=int(address), port=match.group(2), vendor=f"0x{vendor}",
                               product=f"0x{product}", node=node, node_uid=node_uid(node)))
    return found


def observe_devices(root: str, dev_root: str, addresses: set[str], with_usb: bool) -> ObservedHostDevices:
    """Facts about these PCI functions and their groups' members, and (when asked) every USB device."""
    pci: dict[str, PciFunction] = {}
    groups: dict[str, list[str]] = {}
    for address in sorted(addresses):
        pci[address] = function = pci_function(root, address)
        if function.iommu_group is not None and function.iommu_group not in groups:
            groups[function.iommu_group] = group_members(root, function.iommu_group)
    for members in groups.values():
        for member in members:
            if member not in pci:
                pci[member] = pci_function(root, member)
    return ObservedHostDevices(
        iommu=iommu_on(root), vfio_driver=vfio_loaded(root), pci=dict(sorted(pci.items())), groups=groups,
        group_nodes={group: node_uid(vfio_node(dev_root, group)) for group in sorted(groups)},
        usb=usb_devices(root, dev_root) if with_usb else [])
