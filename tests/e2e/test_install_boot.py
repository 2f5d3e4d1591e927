"""The install proof on real firmware: a BIOS or UEFI VM with no kernel file boots an install CD (ISOLINUX or
GRUB; the guest says ``boot=cd``), whose "installer" writes a bootable disk onto the VM's blank disk and powers off;
the CD is then ejected, the record says so, the plan shows the install as done (not drift), and the next start
boots the disk the install wrote (the guest says ``boot=disk``). One run keeps the sync daemon up throughout;
the other kills it with SIGKILL in the middle of the install and lets a fresh ``apply`` finish it.

The media are built from Debian packages by tests/e2e/bootmedia.py into the test host's storage root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import bootmedia
from tests.e2e.harness import GUEST_DIR, Host, Report, wait_gone

pytestmark = pytest.mark.skipif(not bootmedia.ISOLINUX_BIN.exists() or not shutil.which("grub-mkimage"),
                                reason="isolinux or grub-efi-amd64-bin is not installed")

BOOT_TIMEOUT = 240  # firmware + a boot loader reading a 14 MiB kernel is slow under a loaded TCG


def _manifest(name: str, iso: Path, firmware: str = "bios") -> str:
    # No boot.kernel: the firmware boots whatever the boot order finds.
    return f"""apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata:
  name: {name}
spec:
  runStrategy: Always
  machine: {{type: q35, accel: tcg}}
  firmware: {{type: {firmware}}}
  memory: {{size: 256Mi}}
  terminationGracePeriodSeconds: 15
  disks:
    - {{name: root, size: 64Mi}}
  cdroms:
    - {{name: install, image: {iso}, bootOnce: true, ejectAfterInstall: true}}
  bootOrder: [cdrom:install, disk:root]
"""


def _media(host: Host) -> Path:
    disk = bootmedia.disk_image(GUEST_DIR, host.base / "installed-disk.img")
    return bootmedia.install_iso(GUEST_DIR, disk, host.base / "install.iso")



def _installs(host: Host, vm: str) -> list[dict[str, Any]]:
    try:
        record = json.loads((host.state / "vms" / vm / "record.json").read_text())
    except FileNotFoundError:
        return []
    installs: list[dict[str, Any]] = record.get("installs", [])
    return installs


def _serial(host: Host, vm: str) -> str:
    return (host.state / "vms" / vm / "run" / "serial.log").read_text(errors="replace")


def _first_boot_from_cd(host: Host, vm: str, iso: Path) -> tuple[int, Report, float]:
    """The install start: QEMU runs, the guest booted the CD, and the record says the install began."""
    started = time.monotonic()
    pid = int(str(host.wait_for(lambda: host.running_pid(vm), "the install start", timeout=BOOT_TIMEOUT)))
    report = host.guest(vm).wait_report(lambda r: r.boot is not None, boot=1, timeout=BOOT_TIMEOUT,
                                        what="the first boot")
    booted = time.monotonic() - started
    assert report.boot == "cd", report
    assert "INFZ_INSTALL" in report.cds.values()
    began = _installs(host, vm)
    assert [(i["cdrom"], i["image"], i["pid"], i["done"]) for i in began] == [("install", str(iso), pid, False)]
    return pid, report, booted


def _boots_the_installed_disk(host: Host, vm: str, old_pid: int) -> float:
    """After the install: a new QEMU boots the disk the installer wrote, without the medium, and it is done."""
    started = time.monotonic()
    host.wait_for(lambda: (p := host.running_pid(vm)) not in (None, old_pid) and p, "the start after the install",
                  timeout=BOOT_TIMEOUT)
    report = host.guest(vm).wait_report(lambda r: r.boot is not None, boot=2, timeout=BOOT_TIMEOUT,
                                        what="the boot after the install")
    booted = time.monotonic() - started
    assert report.boot == "disk", report
    assert "INFZ_INSTALL" not in report.cds.values(), report.cds
    done = _installs(host, vm)
    assert [(i["done"], i["ejected"], i["pid"]) for i in done] == [(True, True, old_pid)]
    assert host.plan_exit() == 0  # the ejected medium is done, not drift
    return booted


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_install_cd_then_disk_with_the_daemon_up(host: Host, firmware: str) -> None:
    iso = _media(host)
    host.write("vm.yaml", _manifest(firmware, iso, firmware))
    daemon = host.start_sync()
    try:
        pid, report, cd_boot = _first_boot_from_cd(host, firmware, iso)
        assert report.efi is (firmware == "uefi"), report
        assert wait_gone(pid, BOOT_TIMEOUT), "the installer never powered off"
        disk_boot = _boots_the_installed_disk(host, firmware, pid)
    finally:
        assert host.stop_sync(daemon) == 0
    assert "INFZ-INSTALLED /dev/vda 25165824" in _serial(host, firmware)
    print(f"MEASURE install-boot {firmware} cd={cd_boot:.1f}s disk={disk_boot:.1f}s")


def test_bios_install_survives_a_sigkill_of_the_daemon_mid_install(host: Host) -> None:
    iso = _media(host)
    host.write("vm.yaml", _manifest("kill", iso))
    daemon = host.start_sync()
    pid, _, _ = _first_boot_from_cd(host, "kill", iso)
    os.kill(daemon.pid, signal.SIGKILL)  # while the installer writes the disk
    daemon.wait(timeout=30)
    assert wait_gone(pid, BOOT_TIMEOUT), "the installer never powered off"
    assert [i["done"] for i in _installs(host, "kill")] == [False]  # nobody saw the power-off
    planned = host.cli("plan", str(host.manifests), check=True).stdout
    assert "the install from CD-ROM install (medium ejected) ended" in planned, planned
    assert "record the install from install as done; eject install" in planned, planned
    host.apply()
    _boots_the_installed_disk(host, "kill", pid)
    assert "INFZ-INSTALLED /dev/vda 25165824" in _serial(host, "kill")
