"""Kill -9 an apply at every step of a create; the next apply must converge with nothing leaked."""

from __future__ import annotations

import json

import pytest

from reconciler.apply.crashpoints import CRASH_ENV
from tests.e2e.harness import Host, vm_manifest

CREATE_STEPS = ["write-record", "create-disk", "start"]


@pytest.mark.parametrize("moment", ["before", "after"])
@pytest.mark.parametrize("step", CREATE_STEPS)
def test_interrupted_create_converges(host: Host, step: str, moment: str) -> None:
    host.write("c.yaml", vm_manifest("crash", disks="    - {name: root, size: 64Mi}\n"
                                                   "    - {name: data, size: 32Mi}"))
    crashed = host.cli("apply", str(host.manifests), "--yes", env=host.env(**{CRASH_ENV: f"{moment}:{step}"}))
    assert crashed.returncode == -9, crashed.stderr

    host.apply()
    assert len(host.qemu_pids("crash")) == 1, "exactly one QEMU after the re-run"
    report = host.guest("crash").wait_report(lambda r: {"vda", "vdb"} <= set(r.disks), what="both disks")
    assert (report.disks["vda"], report.disks["vdb"]) == (64 * 1024**2, 32 * 1024**2)
    assert host.plan_exit() == 0

    leftovers = [p.name for p in host.state.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    assert leftovers == []
    # Deleting it afterwards leaves no process behind either.
    (host.manifests / "c.yaml").unlink()
    host.apply("--allow-empty")
    assert host.qemu_pids("crash") == []
    assert not (host.state / "vms" / "crash").exists()


def test_start_interrupted_between_launch_and_record_adopts_that_qemu(host: Host) -> None:
    """The narrowest window of a start: QEMU launched, its pid not yet in launch.json. The next plan adopts
    that very QEMU (the pidfile, uid, binary and argv match, and it started after the record) and records it;
    it is never left running beside a second QEMU that cannot get its disks' locks."""
    host.write("c.yaml", vm_manifest("crash", disks="    - {name: root, size: 64Mi}"))
    crashed = host.cli("apply", str(host.manifests), "--yes", env=host.env(**{CRASH_ENV: "launched:start"}))
    assert crashed.returncode == -9, crashed.stderr
    [launched] = host.qemu_pids("crash")
    launch = json.loads((host.state / "vms" / "crash" / "launch.json").read_text())
    assert launch["pid"] is None and launch["not_before"] is not None

    shown = host.cli("plan", str(host.manifests), "--json")
    [change] = json.loads(shown.stdout)["changes"]
    assert [(step["kind"], step["args"]) for step in change["steps"]] == [
        ("write-record", {"vm": change["steps"][0]["args"]["vm"]}), ("record-launch", {"pid": launched})], change
    host.apply()
    assert host.qemu_pids("crash") == [launched], "the launched QEMU was adopted, not replaced"
    launch = json.loads((host.state / "vms" / "crash" / "launch.json").read_text())
    assert launch["pid"] == launched
    report = host.guest("crash").wait_report(lambda r: "vda" in r.disks, what="its disk")
    assert report.disks["vda"] == 64 * 1024**2
    assert host.plan_exit() == 0


@pytest.mark.parametrize("point", ["before:stop", "after:stop", "before:forget", "before:delete-disk",
                                   "after:delete-disk"])
def test_interrupted_delete_converges(host: Host, point: str) -> None:
    host.write("d.yaml", vm_manifest("gone", disks="    - {name: root, size: 64Mi, deletePolicy: Delete}\n"
                                                  "    - {name: kept, size: 16Mi}"))
    host.apply()
    (host.manifests / "d.yaml").unlink()
    crashed = host.cli("apply", str(host.manifests), "--yes", "--allow-empty",
                       env=host.env(**{CRASH_ENV: point}))
    assert crashed.returncode == -9, crashed.stderr

    host.apply("--allow-empty")
    assert host.qemu_pids("gone") == []
    assert not (host.state / "vms" / "gone").exists()
    assert not host.disk("gone", "root").exists()
    assert host.disk("gone", "kept").exists()
    assert host.plan_exit() == 0
