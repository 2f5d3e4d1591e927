"""A fake sysfs tree for host device passthrough tests, and a stand-in for the kernel's reaction to writes.

These machines have no IOMMU, so tests build the tree the host layer reads (``HostConfig.sysfsRoot``):
``bus/pci/devices/ADDR/{class,vendor,device,driver_override}``, ``driver`` and ``iommu_group`` symlinks,
``bus/pci/drivers/NAME/{bind,unbind}``, ``bus/pci/drivers_probe``, ``kernel/iommu_groups/N/devices/ADDR``,
``bus/usb/devices/B-P/...``, and the device nodes under a fake ``devRoot`` (``vfio/N``, ``bus/usb/BBB/DDD``).

Regular files cannot react to writes the way sysfs does, so ``Kernel`` does what the kernel would, either
once (``react()``, for tests that call the binding code in-process) or from a thread polling the tree (for
tests that run the real CLI in a subprocess): a write to a driver's ``unbind`` drops the device's ``driver``
link; a write to ``drivers_probe`` binds the device to its ``driver_override`` if set, else to the driver the
device "naturally" has (what it had when the tree was built); binding to vfio-pci creates ``/dev/vfio/N``
and unbinding the group's last vfio-pci member removes it. Everything it did is logged in ``Kernel.log``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FakeHost:
    sys: Path
    dev: Path
    natural: dict[str, str | None] = field(default_factory=dict)  # address -> the driver the kernel picks

    @classmethod
    def build(cls, base: Path) -> FakeHost:
        host = cls(base / "sys", base / "dev")
        for path in ("bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups", "bus/usb/devices"):
            (host.sys / path).mkdir(parents=True, exist_ok=True)
        (host.sys / "bus/pci/drivers_probe").write_text("")
        (host.dev / "vfio").mkdir(parents=True)
        (host.dev / "vfio/vfio").write_text("")
        host.driver("vfio-pci")
        return host

    def driver(self, name: str) -> Path:
        path = self.sys / "bus/pci/drivers" / name
        path.mkdir(exist_ok=True)
        for attr in ("bind", "unbind", "new_id"):
            (path / attr).touch()
        return path

    def pci(self, address: str, group: str | None, driver: str | None = None, class_code: str = "0x030000",
            net: str | None = None) -> Path:
        device = self.sys / "bus/pci/devices" / address
        device.mkdir()
        (device / "class").write_text(class_code + "\n")
        (device / "vendor").write_text("0x10de\n")
        (device / "device").write_text("0x1c82\n")
        (device / "driver_override").write_text("(null)\n")
        if group is not None:
            members = self.sys / "kernel/iommu_groups" / group / "devices"
            members.mkdir(parents=True, exist_ok=True)
            os.symlink(device, members / address)
            os.symlink(self.sys / "kernel/iommu_groups" / group, device / "iommu_group")
        if driver is not None:
            self.link_driver(address, driver)
        if net is not None:
            (device / "net" / net).mkdir(parents=True)
        self.natural[address] = driver
        return device

    def link_driver(self, address: str, driver: str) -> None:
        os.symlink(self.driver(driver), self.sys / "bus/pci/devices" / address / "driver")

    def driver_of(self, address: str) -> str | None:
        try:
            return os.path.basename(os.readlink(self.sys / "bus/pci/devices" / address / "driver"))
        except OSError:
            return None

    def usb(self, bus: int, port: str, address: int, vendor: str, product: str) -> Path:
        device = self.sys / "bus/usb/devices" / f"{bus}-{port}"
        device.mkdir()
        for name, value in (("busnum", bus), ("devnum", address), ("idVendor", vendor), ("idProduct", product)):
            (device / name).write_text(f"{value}\n")
        node = self.dev / "bus/usb" / f"{bus:03d}" / f"{address:03d}"
        node.parent.mkdir(parents=True, exist_ok=True)
        node.write_text("")
        os.chmod(node, 0o664)
        return node


@dataclass
class Kernel:
    """What the kernel does when sysfs attributes are written (see the module's docstring)."""

    host: FakeHost
    log: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def react(self) -> None:
        for driver in sorted((self.host.sys / "bus/pci/drivers").iterdir()):
            unbind = driver / "unbind"
            if (address := unbind.read_text().strip()):
                unbind.write_text("")
                link = self.host.sys / "bus/pci/devices" / address / "driver"
                if os.path.basename(os.readlink(link)) == driver.name:
                    link.unlink()
                    self.log.append(f"unbind {address} from {driver.name}")
                    self._vfio_node(address)
        probe = self.host.sys / "bus/pci/drivers_probe"
        if (address := probe.read_text().strip()):
            probe.write_text("")
            self._probe(address)

    def _probe(self, address: str) -> None:
        device = self.host.sys / "bus/pci/devices" / address
        if (device / "driver").is_symlink():
            return
        override = (device / "driver_override").read_text().strip()
        wanted = None if override == "(null)" else override or None
        driver = wanted or self.host.natural.get(address)
        if driver is not None:
            self.host.link_driver(address, driver)
            self.log.append(f"probe {address} -> {driver}")
            self._vfio_node(address)

    def _vfio_node(self, address: str) -> None:
        """/dev/vfio/N exists while a member of group N is bound to vfio-pci (root's, 0600, like udev's)."""
        group_link = self.host.sys / "bus/pci/devices" / address / "iommu_group"
        group = os.path.basename(os.readlink(group_link))
        members = [m.name for m in (self.host.sys / "kernel/iommu_groups" / group / "devices").iterdir()]
        node = self.host.dev / "vfio" / group
        if any(self.host.driver_of(m) == "vfio-pci" for m in members):
            if not node.exists():
                node.write_text("")
                os.chmod(node, 0o600)
        else:
            node.unlink(missing_ok=True)

    def start(self) -> Kernel:
        def loop() -> None:
            while not self._stop.wait(0.01):
                self.react()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
