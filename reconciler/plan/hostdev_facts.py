"""What the observer found about host devices a VM asks for: frozen facts, read from sysfs (pure data).

Filled by ``observe/hostdev.py`` (through ``adapters/sysfs.py``) for every PCI function a desired or recorded
VM names, every member of those functions' IOMMU groups and every USB device on the host; judged by
``plan/hostdev.py``. Part of ``ObservedState``, so a device rebound by hand between ``plan --out`` and
``apply`` makes the saved plan stale.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from reconciler.state.models import HostDeviceClaim

VFIO_DRIVER = "vfio-pci"


class _Fact(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PciFunction(_Fact):
    address: str
    exists: bool
    driver: str | None = Field(default=None, description="The driver it is bound to (None: none).")
    class_code: str = Field(default="", description="sysfs 'class', e.g. 0x030000 (display), 0x060400 (bridge).")
    vendor: str = ""
    device: str = ""
    iommu_group: str | None = Field(default=None, description="Its IOMMU group number (None: no iommu_group link).")
    host_uses: list[str] = Field(default_factory=list, description="What the host uses it for: network "
                                 "interfaces and block devices found under it (e.g. 'network interface eth0').")

    @property
    def bridge(self) -> bool:
        """A PCI bridge: it stays with its host driver (pcieport); the kernel allows that in a VFIO group."""
        return self.class_code.lower().startswith("0x0604")


class UsbDevice(_Fact):
    bus: int
    address: int
    port: str = Field(description="Its port path on the bus, e.g. 1.4 (the sysfs name after 'BUS-').")
    vendor: str = Field(description="0x + 4 hex.")
    product: str
    node: str = Field(description="Its device node, /dev/bus/usb/BBB/DDD under the host's devRoot.")
    node_uid: int | None = Field(default=None, description="The node's owner (None: no node).")

    @property
    def key(self) -> str:
        return f"usb:{self.bus}-{self.port}"


class ObservedHostDevices(_Fact):
    iommu: bool = Field(default=False, description="The kernel has IOMMU groups (<sysfs>/kernel/iommu_groups "
                        "non-empty).")
    vfio_driver: bool = Field(default=False, description="vfio-pci is loaded (<sysfs>/bus/pci/drivers/vfio-pci).")
    pci: dict[str, PciFunction] = Field(default_factory=dict, description="By address: the functions asked for "
                                        "and every member of their groups.")
    groups: dict[str, list[str]] = Field(default_factory=dict, description="IOMMU group -> member addresses.")
    group_nodes: dict[str, int | None] = Field(default_factory=dict, description="IOMMU group -> the owner of "
                                               "/dev/vfio/GROUP (None: no node).")
    usb: list[UsbDevice] = Field(default_factory=list)
    claims: dict[str, HostDeviceClaim] = Field(default_factory=dict, description="hostdevs.json: what we hold.")

    def members(self, address: str) -> list[str]:
        """The function's IOMMU group's members (itself alone when it has no group)."""
        found = self.pci.get(address)
        group = found.iommu_group if found else None
        return self.groups.get(group, [address]) if group is not None else [address]
