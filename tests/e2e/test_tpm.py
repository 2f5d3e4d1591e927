"""A VM with a TPM: swtpm runs confined beside QEMU, its state outlives restarts, and no swtpm is orphaned."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
from pathlib import Path

import pytest
import yaml

from reconciler.apply import vmprocess
from reconciler.apply.crashpoints import CRASH_ENV
from reconciler.spec.host import HostConfig
from reconciler.state.layout import StateLayout
from tests.e2e.harness import Host, live_processes, vm_manifest, wait_gone

TPM = "  tpm: {enabled: true}\n"


def _swtpms(host: Host, vm: str) -> list[int]:
    """Live processes whose command line names this VM's TPM state directory."""
    needle = f"dir={host.state / 'tpm' / vm},".encode()
    return live_processes(lambda cmdline: needle in cmdline)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _state_files(host: Host, vm: str) -> dict[str, int]:
    return {entry.name: entry.stat().st_ino for entry in (host.state / "tpm" / vm).iterdir()}


def test_tpm_is_seen_by_the_guest_runs_confined_and_its_state_survives_a_restart(host: Host) -> None:
    host.write("t.yaml", vm_manifest("tpm", extra=TPM))
    host.apply()
    host.guest("tpm").wait_report(lambda r: r.tpm, what="a TPM in the guest")
    [swtpm] = _swtpms(host, "tpm")
    status, qemu_uid = _status(swtpm), pwd.getpwnam("infinization-qemu").pw_uid
    assert set(status["Uid"].split()) == {str(qemu_uid)}
    assert (status["CapEff"], status["CapPrm"], status["CapBnd"], status["NoNewPrivs"]) == ("0" * 16,) * 3 + ("1",)
    state_dir = host.state / "tpm" / "tpm"
    assert (state_dir.stat().st_uid, state_dir.stat().st_mode & 0o777) == (qemu_uid, 0o700)
    before, inode = _state_files(host, "tpm"), state_dir.stat().st_ino
    assert "tpm2-00.permall" in before

    host.write("t.yaml", vm_manifest("tpm", extra=TPM, run_strategy="Halted"))
    host.apply()
    assert host.qemu_pids("tpm") == [] and _swtpms(host, "tpm") == []
    assert _state_files(host, "tpm").keys() == before.keys()

    host.write("t.yaml", vm_manifest("tpm", extra=TPM))
    host.apply()
    host.guest("tpm").wait_report(lambda r: r.tpm, what="the TPM after the restart", boot=2)
    assert len(_swtpms(host, "tpm")) == 1
    assert state_dir.stat().st_ino == inode, "the same TPM state directory, never re-created"
    assert _state_files(host, "tpm").keys() >= before.keys()
    assert host.plan_exit() == 0


def test_sigkill_of_qemu_leaves_no_orphan_swtpm(host: Host) -> None:
    host.write("t.yaml", vm_manifest("tpm", extra=TPM))
    host.apply()
    host.guest("tpm").wait_report(lambda r: r.tpm, what="a TPM in the guest")
    [qemu], [swtpm] = host.qemu_pids("tpm"), _swtpms(host, "tpm")
    os.kill(qemu, signal.SIGKILL)
    assert wait_gone(qemu)
    host.apply()
    assert wait_gone(swtpm), "the old swtpm is gone"
    assert len(host.qemu_pids("tpm")) == 1 and len(_swtpms(host, "tpm")) == 1
    host.guest("tpm").wait_report(lambda r: r.tpm, what="the TPM after the crash", boot=2)


def test_swtpm_left_without_its_qemu_is_stopped_by_the_next_apply(host: Host) -> None:
    """What a kill -9 between the two launches leaves: the VM's swtpm, started by the executor's own code,
    and no QEMU. The next apply finds it (verified) and stops it; with the VM wanted running, exactly one
    swtpm serves the new QEMU."""
    host.write("t.yaml", vm_manifest("tpm", extra=TPM, run_strategy="Halted"))
    host.apply()
    layout = StateLayout(host.state)
    config = HostConfig.model_validate(yaml.safe_load(host.config.read_text()))
    asyncio.run(vmprocess._start_swtpm(layout, layout.vm("tpm"), config))
    [orphan] = _swtpms(host, "tpm")
    plan = host.cli("plan", str(host.manifests), check=True).stdout
    assert f"stop swtpm pid {orphan}, left without its QEMU" in plan
    host.apply()
    assert wait_gone(orphan) and _swtpms(host, "tpm") == []

    asyncio.run(vmprocess._start_swtpm(layout, layout.vm("tpm"), config))
    [orphan] = _swtpms(host, "tpm")
    host.write("t.yaml", vm_manifest("tpm", extra=TPM))
    host.apply()
    assert wait_gone(orphan)
    assert len(host.qemu_pids("tpm")) == 1 and len(_swtpms(host, "tpm")) == 1
    host.guest("tpm").wait_report(lambda r: r.tpm, what="a TPM in the guest")


@pytest.mark.parametrize("point", ["before:start", "after:start"])
def test_interrupted_start_converges_with_one_swtpm_and_one_qemu(host: Host, point: str) -> None:
    host.write("t.yaml", vm_manifest("tpm", extra=TPM))
    crashed = host.cli("apply", str(host.manifests), "--yes", env=host.env(**{CRASH_ENV: point}))
    assert crashed.returncode == -9, crashed.stderr
    host.apply()
    assert len(host.qemu_pids("tpm")) == 1 and len(_swtpms(host, "tpm")) == 1
    host.guest("tpm").wait_report(lambda r: r.tpm, what="a TPM in the guest")
    assert host.plan_exit() == 0
    (host.manifests / "t.yaml").unlink()
    host.apply("--allow-empty")
    assert host.qemu_pids("tpm") == [] and _swtpms(host, "tpm") == []
    assert (host.state / "tpm" / "tpm").is_dir(), "its disk is kept (Retain), so its TPM state is kept too"
