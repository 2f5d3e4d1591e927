"""Kill -9 an apply that creates three VMs side by side, at every step of a create; the next apply must
converge: each VM has exactly one QEMU, every disk at its size, nothing half-written left behind.

With VMs run concurrently, the first VM to reach the crash point kills the process while the others are
anywhere in their own steps (a disk being built under its temporary name, a QEMU launched but not yet
verified, a record just written): the state such a crash leaves is what the re-run must cope with.
"""

from __future__ import annotations

import pytest

from reconciler.apply.crashpoints import CRASH_ENV
from tests.e2e.harness import Host, vm_manifest

CREATE_STEPS = ["write-record", "create-disk", "start"]
# Different disk counts: the three VMs are at different steps when one of them reaches the crash point.
VMS = {
    "cc1": "    - {name: root, size: 64Mi}",
    "cc2": "    - {name: root, size: 64Mi}\n    - {name: data, size: 32Mi}",
    "cc3": "    - {name: root, size: 48Mi}\n    - {name: data, size: 16Mi}\n    - {name: more, size: 24Mi}",
}
SIZES = {"cc1": {"vda": 64}, "cc2": {"vda": 64, "vdb": 32}, "cc3": {"vda": 48, "vdb": 16, "vdc": 24}}


@pytest.mark.parametrize(("moment", "step"), [(moment, step) for step in CREATE_STEPS for moment in ("before", "after")]
                         + [("launched", "start")])  # inside a start: QEMU launched, its pid not yet recorded
def test_interrupted_concurrent_create_converges(host: Host, step: str, moment: str) -> None:
    for name, disks in VMS.items():
        host.write(f"{name}.yaml", vm_manifest(name, disks=disks))
    crashed = host.cli("apply", str(host.manifests), "--yes", env=host.env(**{CRASH_ENV: f"{moment}:{step}"}))
    assert crashed.returncode == -9, crashed.stderr
    if (step, moment) == ("start", "after"):
        # The VMs ran side by side: by the time the first QEMU was up, every VM had been claimed (recorded).
        # One after another, the others would not have been reached yet.
        assert all((host.state / "vms" / name / "record.json").exists() for name in VMS), \
            sorted(p.name for p in (host.state / "vms").iterdir())

    host.apply()
    for name, sizes in SIZES.items():
        assert len(host.qemu_pids(name)) == 1, f"exactly one QEMU of {name} after the re-run"
        want = {disk: mib * 1024**2 for disk, mib in sizes.items()}
        report = host.guest(name).wait_report(lambda r, w=want: set(w) <= set(r.disks), what=f"{name}'s disks")
        assert {disk: report.disks[disk] for disk in want} == want
    assert host.plan_exit() == 0, host.cli("plan", str(host.manifests)).stdout  # what is left, if anything

    leftovers = [p.name for p in host.state.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    assert leftovers == []
    for name in VMS:
        (host.manifests / f"{name}.yaml").unlink()
    host.apply("--allow-empty")
    assert all(host.qemu_pids(name) == [] for name in VMS)
    assert not any((host.state / "vms" / name).exists() for name in VMS)
