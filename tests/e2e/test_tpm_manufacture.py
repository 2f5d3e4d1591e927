"""The TPM state is manufactured once, like libvirt's swtpm_setup: EK keys, EK certificates and a platform
certificate in NV (the guest reads the RSA EK certificate's NV index through /dev/tpm0), made by QEMU's
unprivileged user into a private state; a finished state is never made again, a half-made one is redone."""

from __future__ import annotations

import json
import pwd

from tests.e2e.harness import Host, vm_manifest

TPM = "  tpm: {enabled: true}\n"


def _setup(host: Host, vm: str) -> dict[str, object]:
    record: dict[str, object] = json.loads((host.state / "tpm" / f"{vm}.setup.json").read_text())
    return record


def _serial_number(host: Host) -> int:
    """How many certificates the installation's local CA has issued (swtpm_localca's counter)."""
    return int((host.state / "tpm" / ".localca" / "certserial").read_text())


def test_tpm_state_is_manufactured_once_with_ek_and_platform_certificates(host: Host) -> None:
    host.write("t.yaml", vm_manifest("tpmm", extra=TPM))
    applied = host.apply().stdout
    report = host.guest("tpmm").wait_report(lambda r: r.tpm, what="a TPM in the guest")
    assert report.ek_cert is True, report  # the guest reads NV index 0x01c00002 itself
    assert "TPM manufactured" in applied, applied
    record = _setup(host, "tpmm")
    assert record["state"] == "done"
    assert "nv 0x1c00002 RSA 2048 EK certificate" in record["made"]  # type: ignore[operator]
    assert "nv 0x1c08000 platform certificate" in record["made"]  # type: ignore[operator]
    qemu_uid = pwd.getpwnam("infinization-qemu").pw_uid
    state, ca = host.state / "tpm" / "tpmm", host.state / "tpm" / ".localca"
    for folder in (state, ca):
        assert (folder.stat().st_uid, folder.stat().st_mode & 0o777) == (qemu_uid, 0o700), folder
    assert (state / "tpm2-00.permall").stat().st_uid == qemu_uid, "made by QEMU's user, not root"
    assert (ca / "signkey.pem").stat().st_mode & 0o077 in (0, 0o040), "the CA key is private"
    issued = _serial_number(host)

    # A restart: the finished state is kept, never made again (no new certificate issued).
    host.write("t.yaml", vm_manifest("tpmm", extra=TPM, run_strategy="Halted"))
    host.apply()
    host.write("t.yaml", vm_manifest("tpmm", extra=TPM))
    assert "TPM manufactured" not in host.apply().stdout
    report = host.guest("tpmm").wait_report(lambda r: r.tpm, what="the TPM after a restart", boot=2)
    assert report.ek_cert is True and _serial_number(host) == issued and _setup(host, "tpmm") == record

    # What a crash in the middle of the manufacture leaves: "begun" and a truncated state. It is redone.
    host.write("t.yaml", vm_manifest("tpmm", extra=TPM, run_strategy="Halted"))
    host.apply()
    (host.state / "tpm" / "tpmm.setup.json").write_text('{"state": "begun"}')
    (state / "tpm2-00.permall").write_bytes(b"half")
    host.write("t.yaml", vm_manifest("tpmm", extra=TPM))
    applied = host.apply().stdout
    assert "a half-made state of" in applied, applied
    report = host.guest("tpmm").wait_report(lambda r: r.tpm, what="the TPM after the redo", boot=3)
    assert report.ek_cert is True and _setup(host, "tpmm")["state"] == "done"
    assert _serial_number(host) > issued and (state / "tpm2-00.permall").stat().st_size > 1000
    assert host.plan_exit() == 0
