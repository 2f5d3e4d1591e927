"""Faults on real QEMU, without the sync daemon: a start that never runs, a QEMU whose monitor does not
answer, a set-up QEMU rejects after boot, a full state file system, and how a VM's last QEMU ended when no
daemon watched it. Each proves the state of the world afterwards: no QEMU of ours left running half-set-up,
no pidfile or socket naming a dead process, no claim on a disk that is not there, and a next plan that says
how to go on."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess

from reconciler.adapters import monitor
from tests.e2e.harness import Host, vm_manifest, wait_gone


def _powerdown(host: Host, vm: str) -> None:
    """Press the ACPI power button: the guest powers itself off cleanly."""
    async def press() -> None:
        async with monitor.session(host.state / "vms" / vm / "run" / "qmp.sock") as qmp:
            await qmp.execute("system_powerdown")
    asyncio.run(press())


def _run_files(host: Host, vm: str) -> list[str]:
    """What names a QEMU process in the VM's run directory: its pidfile and sockets."""
    run = host.state / "vms" / vm / "run"
    return sorted(p.name for p in run.glob("*") if p.name.endswith((".pid", ".sock")) and p.name != "swtpm.pid")


def _the_pid(host: Host, vm: str) -> int:
    pids = host.qemu_pids(vm)
    assert len(pids) == 1, f"exactly one QEMU for {vm}, found {pids}"
    return pids[0]


def test_a_start_that_never_runs_is_killed_and_cleaned_up(host: Host) -> None:
    # A QEMU that comes up paused (-S) never reports its guest running: the start must time out, kill the
    # very process it launched, and leave no pidfile or socket behind.
    wrapper = host.base / "paused-qemu"
    wrapper.write_text('#!/bin/sh\nexec /usr/bin/qemu-system-x86_64 -S "$@"\n')
    wrapper.chmod(0o755)
    good_config = host.config.read_text()
    host.config.write_text(good_config + f"qemuBinary: {wrapper}\nstartTimeout: 3\n")
    host.write("s.yaml", vm_manifest("s"))

    failed = host.apply(check=False)
    assert failed.returncode != 0
    said = failed.stdout + failed.stderr
    assert "did not reach 'running' within 3s (status prelaunch)" in said, said
    assert "was killed" in said, said
    assert host.qemu_pids("s") == [], "the QEMU of the failed start is gone"
    assert _run_files(host, "s") == [], "no pidfile or socket names a dead QEMU"

    # The next plan says how to go on: start it (again); with the host fixed, it runs.
    assert "start" in host.cli("plan", str(host.manifests)).stdout
    host.config.write_text(good_config)
    host.apply()
    host.guest("s").wait_report(lambda r: "vda" in r.disks, what="boot")
    assert host.plan_exit() == 0


def test_a_qemu_whose_monitor_does_not_answer_is_restarted_with_permission(host: Host) -> None:
    host.write("m.yaml", vm_manifest("m"))
    host.apply()
    host.guest("m").wait_report(lambda r: "vda" in r.disks, what="boot")
    stuck = _the_pid(host, "m")
    os.kill(stuck, signal.SIGSTOP)  # QEMU hangs: its monitor accepts connections but never answers

    plan = host.cli("plan", str(host.manifests))
    assert "does not answer" in plan.stdout + plan.stderr, plan.stdout + plan.stderr
    host.apply(check=False)
    assert host.qemu_pids("m") == [stuck], "without --allow-restart the stuck QEMU is left alone"

    restarted = host.apply("--allow-restart")
    assert wait_gone(stuck, timeout=5), restarted.stdout
    assert len(host.qemu_pids("m")) == 1 and host.qemu_pids("m") != [stuck]
    host.guest("m").wait_report(lambda r: "vda" in r.disks, what="boot after the restart", boot=2)
    assert host.plan_exit() == 0


def test_without_the_daemon_rerun_on_failure_restarts_a_kill_not_a_clean_power_off(host: Host) -> None:
    host.write("r.yaml", vm_manifest("r", run_strategy="RerunOnFailure"))
    host.apply()
    host.guest("r").wait_report(lambda r: "vda" in r.disks, what="boot")

    killed = _the_pid(host, "r")
    os.kill(killed, signal.SIGKILL)
    assert wait_gone(killed)
    assert "crash" in host.cli("plan", str(host.manifests)).stdout
    host.apply()
    host.guest("r").wait_report(lambda r: "vda" in r.disks, what="boot after the kill", boot=2)

    clean = _the_pid(host, "r")
    _powerdown(host, "r")
    assert wait_gone(clean, timeout=60)
    applied = host.apply()
    assert host.qemu_pids("r") == [], f"a clean power-off is not restarted: {applied.stdout}"
    assert host.plan_exit() == 0
    status = json.loads(host.cli("status", "--json", str(host.manifests)).stdout)["vms"][0]
    assert status["phase"] == "Stopped", status


def test_an_io_limit_qemu_rejects_leaves_no_vm_running_without_it(host: Host) -> None:
    # QEMU's throttle limit is 1e15 per second. Where validate knows it, the manifest is refused there;
    # otherwise the start must fail whole: no QEMU left running without the limit its manifest asks.
    host.write("t.yaml", vm_manifest("t", disks="    - {name: root, size: 64Mi, iops: 2000000000000000}"))
    validated = host.cli("validate", str(host.manifests))
    if validated.returncode != 0:
        assert "iops" in validated.stdout + validated.stderr
        return
    failed = host.apply(check=False)
    assert failed.returncode != 0
    said = failed.stdout + failed.stderr
    assert "was killed" in said, said
    assert host.qemu_pids("t") == [], "no QEMU runs without its I/O limit"
    assert _run_files(host, "t") == []
    again = host.apply(check=False)  # fails the same way, and cleanly again: never a half-started VM
    assert again.returncode != 0 and host.qemu_pids("t") == []

    host.write("t.yaml", vm_manifest("t", disks="    - {name: root, size: 64Mi, iops: 5000}"))
    host.apply()
    host.guest("t").wait_report(lambda r: "vda" in r.disks, what="boot with the fixed limit")
    assert host.plan_exit() == 0


def test_a_full_state_file_system_rolls_back_the_disk_create(host: Host) -> None:
    host.state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0700", "infz-faults", str(host.state)], check=True)
    try:
        host.write("f.yaml", vm_manifest("f", disks="    - {name: root, size: 64Mi, preallocation: full}"))
        failed = host.apply(check=False)
        assert failed.returncode != 0
        assert "No space left on device" in failed.stdout + failed.stderr, failed.stdout + failed.stderr
        record = json.loads((host.state / "vms" / "f" / "record.json").read_text())
        assert record["owned_disks"] == [], "no claim on a disk that is not there"
        assert not host.disk("f", "root").exists()
        assert [p.name for p in host.state.rglob("*.partial")] == []
        assert host.qemu_pids("f") == []
        assert "create" in host.cli("plan", str(host.manifests)).stdout  # how to go on

        host.write("f.yaml", vm_manifest("f", disks="    - {name: root, size: 64Mi}"))
        host.apply()
        host.guest("f").wait_report(lambda r: r.disks.get("vda") == 64 * 1024**2, what="the disk")
        assert host.plan_exit() == 0
    finally:
        host.kill_all()
        for pid in host.qemu_pids("f"):
            wait_gone(pid)
        subprocess.run(["umount", "-l", str(host.state)], check=False)



def test_a_start_qemu_refuses_for_a_host_limit_leaves_nothing_behind(host: Host) -> None:
    # More memory than the host can give: where validate checks it against the host, it is refused there;
    # otherwise QEMU refuses at start, and nothing of that start is left (no process, pidfile or socket).
    host.write("big.yaml", vm_manifest("big", memory="1Ti"))
    validated = host.cli("validate", str(host.manifests))
    if validated.returncode != 0:
        assert "memory" in validated.stdout + validated.stderr
        return
    failed = host.apply(check=False)
    assert failed.returncode != 0
    said = failed.stdout + failed.stderr
    assert "QEMU refused to start" in said and "memory" in said, said
    assert host.qemu_pids("big") == [] and _run_files(host, "big") == []
    assert "start" in host.cli("plan", str(host.manifests)).stdout  # how to go on: fix it, apply again
    host.write("big.yaml", vm_manifest("big"))
    host.apply()
    host.guest("big").wait_report(lambda r: "vda" in r.disks, what="boot with a sane memory size")
    assert host.plan_exit() == 0
