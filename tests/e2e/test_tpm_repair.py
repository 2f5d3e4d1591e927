"""A swtpm that dies under its running QEMU: the guest's TPM fails every command and QEMU cannot reconnect, so
the plan shows a restart with that reason; `apply --allow-restart` (or the sync daemon, with restartPolicy:
Auto) restarts the VM with a new swtpm on the same TPM state, and the guest sees its TPM again."""

from __future__ import annotations

import os
import signal

from tests.e2e.harness import Host, live_processes, vm_manifest, wait_gone

TPM = "  tpm: {enabled: true}\n"
REASON = "tpm: its swtpm (the TPM emulator) is gone while QEMU runs"


def _swtpms(host: Host, vm: str) -> list[int]:
    needle = f"dir={host.state / 'tpm' / vm},".encode()
    return live_processes(lambda cmdline: needle in cmdline)


def _kill_swtpm(host: Host, vm: str) -> int:
    [swtpm] = _swtpms(host, vm)
    os.kill(swtpm, signal.SIGKILL)
    assert wait_gone(swtpm)
    return swtpm


def test_swtpm_killed_under_qemu_is_a_planned_restart_on_the_same_state(host: Host) -> None:
    host.write("t.yaml", vm_manifest("tpmr", extra=TPM))
    host.apply()
    host.guest("tpmr").wait_report(lambda r: r.tpm, what="a TPM in the guest")
    state = host.state / "tpm" / "tpmr"
    inode, files = state.stat().st_ino, {p.name for p in state.iterdir()}
    [qemu] = host.qemu_pids("tpmr")
    _kill_swtpm(host, "tpmr")

    assert host.qemu_pids("tpmr") == [qemu]  # QEMU keeps running without its TPM
    planned = host.cli("plan", str(host.manifests), check=True).stdout
    assert REASON in planned and "restart pending" in planned, planned
    assert host.plan_exit() == 2
    host.apply("--allow-restart")
    assert wait_gone(qemu)
    host.guest("tpmr").wait_report(lambda r: r.tpm, what="the TPM after the restart", boot=2)
    assert len(_swtpms(host, "tpmr")) == 1 and len(host.qemu_pids("tpmr")) == 1
    assert state.stat().st_ino == inode and {p.name for p in state.iterdir()} >= files, "the same TPM state"
    assert host.plan_exit() == 0


def test_the_sync_daemon_restarts_a_vm_whose_swtpm_died_with_restart_policy_auto(host: Host) -> None:
    host.write("t.yaml", vm_manifest("tpma", extra=TPM + "  restartPolicy: Auto\n"))
    daemon = host.start_sync()
    try:
        host.guest("tpma").wait_report(lambda r: r.tpm, what="a TPM in the guest", timeout=120)
        [qemu] = host.qemu_pids("tpma")
        old = _kill_swtpm(host, "tpma")
        assert wait_gone(qemu, 120), "the daemon never restarted the VM"
        host.guest("tpma").wait_report(lambda r: r.tpm, what="the TPM after the daemon's restart", boot=2,
                                       timeout=120)
        assert [p for p in _swtpms(host, "tpma") if p != old] and len(host.qemu_pids("tpma")) == 1
    finally:
        assert host.stop_sync(daemon) == 0
    assert host.plan_exit() == 0
