"""UEFI firmware end to end: OVMF boots the test guest's kernel (fw_cfg) and the guest reports EFI; the VM's
variable store is copied once and survives a kill -9 right after the copy and a Halted -> Always restart
(same inode); Secure Boot mode; a host without OVMF refuses UEFI VMs at plan time, naming the package."""

from __future__ import annotations

import time

from reconciler.apply.crashpoints import CRASH_ENV
from tests.e2e.harness import Host, vm_manifest

UEFI_TIMEOUT = 90  # OVMF under TCG on a shared machine: a boot takes 10-15 s alone


def _uefi(name: str, run_strategy: str = "Always", secure: bool = False) -> str:
    firmware = "{type: uefi, secureBoot: true}" if secure else "{type: uefi}"
    return vm_manifest(name, run_strategy=run_strategy, extra=f"  firmware: {firmware}\n")


def test_uefi_boots_and_keeps_its_variables_across_a_crash_and_a_restart(host: Host) -> None:
    host.write("u.yaml", _uefi("uefi"))
    crashed = host.cli("apply", str(host.manifests), "--yes", env=host.env(**{CRASH_ENV: "after:create-efi-vars"}))
    assert crashed.returncode == -9, crashed.stderr
    store = host.state / "disks" / "uefi" / "efivars.fd"
    first = store.stat()
    assert (first.st_mode & 0o777, first.st_size) == (0o600, 540672), "a private copy of OVMF_VARS_4M.fd"
    assert host.qemu_pids("uefi") == []

    plan = host.cli("plan", str(host.manifests), check=True).stdout
    assert "create-efi-vars" not in plan and "UEFI variables: copy" not in plan, plan
    host.apply()
    report = host.guest("uefi").wait_report(lambda r: r.efi, what="an EFI boot", timeout=UEFI_TIMEOUT)
    assert report.efi and report.secure_boot is False
    assert store.stat().st_ino == first.st_ino, "the store is not copied again"
    assert [p.name for p in store.parent.iterdir() if p.name.endswith(".tmp")] == []

    host.write("u.yaml", _uefi("uefi", run_strategy="Halted"))
    host.apply()
    assert host.qemu_pids("uefi") == []
    host.write("u.yaml", _uefi("uefi"))
    host.apply()
    host.guest("uefi").wait_report(lambda r: r.efi, what="an EFI boot after the restart", boot=2,
                                   timeout=UEFI_TIMEOUT)
    assert store.stat().st_ino == first.st_ino, "kept across the restart"
    assert host.plan_exit() == 0


def test_secure_boot_mode(host: Host) -> None:
    host.write("s.yaml", _uefi("secure", secure=True))
    host.apply()
    guest = host.guest("secure")
    deadline = time.monotonic() + UEFI_TIMEOUT
    while time.monotonic() < deadline and not guest.reports() and b"Access Denied" not in guest.serial.read_bytes():
        time.sleep(0.5)
    reports = guest.reports()
    if reports:  # the guest booted: then Secure Boot must say it is on
        assert reports[-1].efi and reports[-1].secure_boot is True, reports[-1]
    else:  # or the firmware refused the unsigned kernel
        assert b"Access Denied" in guest.serial.read_bytes(), guest.serial.read_bytes()[-2000:]


def test_a_host_without_ovmf_refuses_uefi_at_plan(host: Host) -> None:
    empty = host.base / "no-firmware"
    empty.mkdir()
    host.config.write_text(host.config.read_text() + f"firmwareDirs: [{empty}]\n")
    host.write("u.yaml", _uefi("nofw"))
    plan = host.cli("plan", str(host.manifests))
    assert plan.returncode == 1, plan.stdout + plan.stderr
    assert "install the Debian package `ovmf`" in plan.stdout, plan.stdout
    host.cli("apply", str(host.manifests), "--yes")
    assert host.qemu_pids("nofw") == [] and not (host.state / "disks" / "nofw").exists()
