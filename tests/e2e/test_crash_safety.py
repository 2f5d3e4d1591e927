"""Kill -9 an apply at every step of a create; the next apply must converge with nothing leaked."""

from __future__ import annotations

import pytest

from reconciler.apply.executor import CRASH_ENV
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
