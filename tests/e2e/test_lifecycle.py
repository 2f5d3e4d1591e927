"""The whole life of one VM on real QEMU, proven from inside the guest and from the host."""

from __future__ import annotations

import json

from tests.e2e.harness import Host, vm_manifest, wait_gone

MiB = 1024**2


def test_create_grow_halt_delete(host: Host) -> None:
    host.write("demo.yaml", vm_manifest("demo", disks="    - {name: root, size: 64Mi}",
                                        mac="52:54:00:aa:00:01"))
    assert host.plan_exit() == 2

    host.apply()
    pids = host.qemu_pids("demo")
    assert len(pids) == 1
    report = host.guest("demo").wait_report(lambda r: "vda" in r.disks, what="its disk")
    assert report.disks["vda"] == 64 * MiB
    assert report.nics["eth0"] == ("52:54:00:aa:00:01", "up")
    assert host.plan_exit() == 0, "a second plan after apply must be empty"

    status = json.loads(host.cli("status", "--json", check=True).stdout)
    (row,) = status["vms"]
    assert (row["name"], row["phase"], row["pid"], row["inSync"]) == ("demo", "Running", pids[0], True)

    # Grow the disk live: same QEMU, and the guest sees the new size.
    host.write("demo.yaml", vm_manifest("demo", disks="    - {name: root, size: 96Mi}",
                                        mac="52:54:00:aa:00:01"))
    applied = host.apply()
    assert "block_resize" in applied.stdout
    host.guest("demo").wait_report(lambda r: r.disks.get("vda") == 96 * MiB, after_seq=report.seq,
                                   what="vda at 96Mi")
    assert host.qemu_pids("demo") == pids
    assert host.plan_exit() == 0

    # Shrinking is refused, and nothing changes.
    host.write("demo.yaml", vm_manifest("demo", disks="    - {name: root, size: 32Mi}",
                                        mac="52:54:00:aa:00:01"))
    refused = host.apply(check=False)
    assert refused.returncode == 1
    assert "never shrink" in refused.stdout
    info = json.loads(__import__("subprocess").run(
        ["qemu-img", "info", "-U", "--output=json", str(host.disk("demo", "root"))],
        capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == 96 * MiB

    # Halted: the guest is powered off and the process is gone.
    host.write("demo.yaml", vm_manifest("demo", disks="    - {name: root, size: 96Mi}",
                                        mac="52:54:00:aa:00:01", run_strategy="Halted"))
    host.apply()
    assert wait_gone(pids[0], timeout=5)
    assert host.qemu_pids("demo") == []
    assert "INFZ-POWEROFF" in host.guest("demo").serial.read_text(), "stop must be graceful (ACPI)"
    assert host.plan_exit() == 0

    # Removing the manifest deletes the VM but keeps its disk (deletePolicy defaults to Retain).
    (host.manifests / "demo.yaml").unlink()
    assert host.plan_exit() == 2
    host.apply("--allow-empty")
    assert not (host.state / "vms" / "demo").exists()
    assert host.disk("demo", "root").exists()
    assert host.plan_exit() == 0


def test_offline_grow_and_restart_from_halted(host: Host) -> None:
    host.write("vm.yaml", vm_manifest("cold", run_strategy="Halted"))
    host.apply()
    assert host.disk("cold", "root").exists()
    assert host.qemu_pids("cold") == []
    host.write("vm.yaml", vm_manifest("cold", disks="    - {name: root, size: 80Mi}"))
    out = host.apply().stdout
    assert "qemu-img resize" in out
    report = host.guest("cold").wait_report(lambda r: "vda" in r.disks, what="its disk")
    assert report.disks["vda"] == 80 * MiB


def test_invalid_manifest_changes_nothing(host: Host) -> None:
    host.write("a.yaml", vm_manifest("keep"))
    host.apply()
    (pid,) = host.qemu_pids("keep")
    before = sorted(p.relative_to(host.state) for p in host.state.rglob("*") if p.is_file())
    record = (host.state / "vms/keep/record.json").read_text()

    # A broken edit of the same VM (unknown field) and another broken file.
    host.write("a.yaml", vm_manifest("keep").replace("runStrategy: Always", "runStrategy: Always\n  bogus: 1"))
    host.write("b.yaml", "apiVersion: infinization.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: x}\n"
                         "spec: {memory: {size: 12Q}}\n")
    done = host.apply(check=False)
    assert done.returncode == 1
    assert "a.yaml:7:3: spec.bogus: unknown field 'bogus'" in done.stderr
    assert "b.yaml:4:23: spec.memory.size: invalid size '12Q'" in done.stderr
    assert "nothing was changed" in done.stderr
    assert host.qemu_pids("keep") == [pid]
    assert (host.state / "vms/keep/record.json").read_text() == record
    after = sorted(p.relative_to(host.state) for p in host.state.rglob("*") if p.is_file())
    assert after == before

    # Even an empty, broken directory of manifests deletes nothing.
    (host.manifests / "a.yaml").write_text("{{{")
    assert host.apply(check=False).returncode == 1
    assert host.qemu_pids("keep") == [pid]

    # status still works with a broken file: the VM is shown with its last applied spec.
    status = host.cli("status", "--json", str(host.manifests))
    assert status.returncode == 0 and "warning:" in status.stderr
    rows = {row["name"]: row for row in json.loads(status.stdout)["vms"]}
    assert rows["keep"]["phase"] == "Running" and rows["keep"]["action"] is None

    # A directory with no manifest at all is refused unless --allow-empty.
    for path in host.manifests.iterdir():
        path.unlink()
    refused = host.apply(check=False)
    assert refused.returncode == 1 and "holds no manifests" in refused.stderr
    assert host.qemu_pids("keep") == [pid]
    host.apply("--allow-empty")
    assert host.qemu_pids("keep") == []


def test_delete_policy_only_deletes_disks_we_created(host: Host) -> None:
    # A file already at the disk's path was not created by us: kept even with deletePolicy Delete.
    foreign = host.disk("pol", "mine")
    foreign.parent.mkdir(parents=True)
    __import__("subprocess").run(["qemu-img", "create", "-q", "-f", "qcow2", str(foreign), "16M"], check=True)
    disks = ("    - {name: root, size: 64Mi, deletePolicy: Delete}\n"
             "    - {name: mine, size: 16Mi, deletePolicy: Delete}\n"
             "    - {name: keep, size: 16Mi}")
    host.write("pol.yaml", vm_manifest("pol", disks=disks, run_strategy="Halted"))
    host.apply()
    (host.manifests / "pol.yaml").unlink()
    plan = host.cli("plan", str(host.manifests), check=True).stdout
    assert "deletePolicy: Delete" in plan
    host.apply("--allow-empty")
    assert not host.disk("pol", "root").exists()
    assert host.disk("pol", "mine").exists(), "a disk we did not create must never be deleted"
    assert host.disk("pol", "keep").exists()


def test_saved_plan_is_refused_when_stale(host: Host) -> None:
    host.write("s.yaml", vm_manifest("saved", run_strategy="Halted"))
    planfile = host.base / "p.json"
    host.cli("plan", str(host.manifests), "--out", str(planfile), check=True)
    saved = json.loads(planfile.read_text())
    assert saved["formatVersion"] == 2 and saved["changes"][0]["action"] == "create"

    host.write("s.yaml", vm_manifest("saved", run_strategy="Halted", memory="128Mi"))
    stale = host.cli("apply", str(planfile))
    assert stale.returncode == 1 and "stale: the manifests changed" in stale.stderr
    assert not (host.state / "vms" / "saved").exists()

    host.cli("plan", str(host.manifests), "--out", str(planfile), check=True)
    host.cli("apply", str(planfile), check=True)
    assert (host.state / "vms/saved/record.json").exists()
    assert host.plan_exit() == 0


def test_concurrent_apply_is_refused_clearly(host: Host) -> None:
    from reconciler.apply.lock import StateLock

    host.write("l.yaml", vm_manifest("locked", run_strategy="Halted"))
    with StateLock(host.state / "lock", exclusive=True):
        done = host.cli("apply", str(host.manifests), "--yes", "--lock-timeout", "0.5")
    assert done.returncode == 1
    assert "another infinization run" in done.stderr
    assert not (host.state / "vms" / "locked").exists()


def test_restart_needing_change_waits_for_permission(host: Host) -> None:
    host.write("r.yaml", vm_manifest("rs"))
    host.apply()
    (pid,) = host.qemu_pids("rs")
    host.guest("rs").wait_report(lambda r: r.cpus == 1, what="1 cpu")

    changed = vm_manifest("rs", cores=2).replace("type: q35", "type: pc")
    host.write("r.yaml", changed)
    plan = host.cli("plan", str(host.manifests), "--detailed-exitcode")
    assert plan.returncode == 2
    assert "machine.type changed (q35 -> pc)" in plan.stdout, "every cause is listed"
    assert "vCPUs 1 -> 2" in plan.stdout
    host.apply()
    assert host.qemu_pids("rs") == [pid], "no restart without permission"
    status = json.loads(host.cli("status", "--json", check=True).stdout)["vms"][0]
    assert status["inSync"] is False and len(status["pendingRestart"]) == 2

    # Reverting the change clears the pending restart.
    host.write("r.yaml", vm_manifest("rs"))
    assert host.plan_exit() == 0

    host.write("r.yaml", changed)
    host.apply("--allow-restart")
    (new_pid,) = host.qemu_pids("rs")
    assert new_pid != pid
    host.guest("rs").wait_report(lambda r: r.cpus == 2, what="2 cpus")
    assert host.plan_exit() == 0


def test_manual_vm_is_started_and_stopped_only_on_request(host: Host) -> None:
    host.write("m.yaml", vm_manifest("man", run_strategy="Manual"))
    host.apply()
    assert host.disk("man", "root").exists() and host.qemu_pids("man") == []
    assert host.plan_exit() == 0, "a stopped Manual VM is in sync"
    host.cli("start", "man", "--manifests", str(host.manifests), check=True)
    host.guest("man").wait_report(lambda r: "vda" in r.disks, what="boot")
    assert host.plan_exit() == 0, "a running Manual VM is in sync too"
    before = (host.manifests / "m.yaml").read_text()
    host.cli("stop", "man", "--manifests", str(host.manifests), check=True)
    assert host.qemu_pids("man") == []
    assert (host.manifests / "m.yaml").read_text() == before, "imperative commands never rewrite manifests"
