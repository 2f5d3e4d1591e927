"""Secure Boot toggled on an existing UEFI VM, end to end: the keys live in the VM's variable store, so the
restart replaces it from the other OVMF template (the old store kept as a dated backup) and the guest sees the
new mode. Without the replacement the Secure Boot code runs on the old keyless store and the guest reports
Secure Boot off (setup mode), so this test fails."""

from __future__ import annotations

import time

from tests.e2e.harness import Host, vm_manifest

UEFI_TIMEOUT = 120  # OVMF under TCG on a shared machine


def _uefi(secure: bool) -> str:
    return vm_manifest("sbt", extra=f"  firmware: {{type: uefi, secureBoot: {str(secure).lower()}}}\n")


def _secure_boot_seen(host: Host, boot: int, since: int) -> bool:
    """The guest's Secure Boot state on its ``boot``-th boot; an unsigned kernel refused by the firmware
    ("Access Denied" on the console after ``since``) also proves Secure Boot is enforced."""
    guest = host.guest("sbt")
    deadline = time.monotonic() + UEFI_TIMEOUT
    while time.monotonic() < deadline:
        reports = guest.reports(boot)
        if reports and reports[-1].efi:
            assert reports[-1].secure_boot is not None, reports[-1]
            return reports[-1].secure_boot
        if b"Access Denied" in guest.serial.read_bytes()[since:]:
            return True
        time.sleep(0.5)
    raise AssertionError(f"no EFI boot {boot} reported; console tail: {guest.serial.read_bytes()[-1500:]!r}")


def test_secure_boot_toggle_replaces_the_variable_store(host: Host) -> None:
    store = host.state / "disks" / "sbt" / "efivars.fd"
    host.write("vm.yaml", _uefi(False))
    host.apply()
    assert _secure_boot_seen(host, 1, 0) is False
    plain = store.read_bytes()

    host.write("vm.yaml", _uefi(True))
    planned = host.cli("plan", str(host.manifests), "--allow-restart", check=True).stdout
    assert "OVMF_VARS_4M.ms.fd (Secure Boot on: the guest's boot entries are reset)" in planned, planned
    since, boot = host.guest("sbt").serial.stat().st_size, host.guest("sbt").boots() + 1
    host.apply("--allow-restart")
    assert _secure_boot_seen(host, boot, since) is True
    backups = sorted(store.parent.glob("efivars.fd.*.bak"))
    assert len(backups) == 1 and backups[0].read_bytes()[:4096] == plain[:4096], backups
    assert (backups[0].stat().st_mode & 0o777, store.stat().st_mode & 0o777) == (0o600, 0o600)
    assert host.plan_exit() == 0  # replaced once: the new store is kept from now on

    host.write("vm.yaml", _uefi(False))
    since, boot = host.guest("sbt").serial.stat().st_size, host.guest("sbt").boots() + 1
    host.apply("--allow-restart")
    assert _secure_boot_seen(host, boot, since) is False
    assert len(list(store.parent.glob("efivars.fd.*.bak"))) == 2
    assert host.plan_exit() == 0
