"""Kill -9 an apply before and after every step of creating and of deleting a UEFI + TPM VM (OVMF booting the
test guest's kernel, a disk with deletePolicy: Delete, a cloud-init seed): the next apply must converge.

After a create: one verified QEMU and one verified swtpm, both as QEMU's user; the guest sees EFI, a TPM and
its seed; the UEFI variable store is the one first copied (same inode); the plan is empty; no temporary file,
and no socket or pidfile but those of the two live processes. After a delete: no process, no VM folder, no TPM
state, no variable store, no deleted disk, no socket.

Cost: a UEFI boot takes 10-15 s under TCG, so only the create points wait for the guest; the delete points
start from a VM whose guest may still be in the firmware, with a short grace period (the stop then quits).
"""

from __future__ import annotations

import asyncio
import pwd
from pathlib import Path

import pytest
import yaml

from reconciler.adapters import procfs
from reconciler.apply import vmprocess
from reconciler.apply.crashpoints import CRASH_ENV
from reconciler.spec.host import HostConfig
from reconciler.state.layout import StateLayout, VMPaths
from tests.e2e.harness import Host, live_processes, vm_manifest

VM = "desk"
UEFI_TIMEOUT = 90  # OVMF under TCG on a shared machine: a boot takes 10-15 s alone
DESKTOP = """  firmware: {type: uefi}
  tpm: {enabled: true}
  cloudInit:
    userData: |
      #cloud-config
      hostname: desk
"""
CREATE_STEPS = ["write-record", "create-disk", "create-efi-vars", "start"]
# A delete plans stop-tpm only for a swtpm left without its QEMU: those two points start from one.
DELETE_STEPS = ["stop", "delete-disk", "delete-tpm-state", "delete-efi-vars", "forget"]


def _manifest(run_strategy: str = "Always", grace: int = 15) -> str:
    text = vm_manifest(VM, run_strategy=run_strategy, extra=DESKTOP,
                       disks="    - {name: root, size: 64Mi, deletePolicy: Delete}")
    return text.replace("terminationGracePeriodSeconds: 15", f"terminationGracePeriodSeconds: {grace}")


def _paths(host: Host) -> VMPaths:
    return StateLayout(host.state).vm(VM)


def _swtpms(host: Host) -> list[int]:
    needle = f"dir={host.state / 'tpm' / VM},".encode()
    return live_processes(lambda cmdline: needle in cmdline)


def _crash(host: Host, point: str, *extra: str) -> None:
    crashed = host.cli("apply", str(host.manifests), "--yes", *extra, env=host.env(**{CRASH_ENV: point}))
    assert crashed.returncode == -9, f"apply did not reach {point}: {crashed.stdout}\n{crashed.stderr}"


def _store(host: Host) -> Path:
    return host.state / "disks" / VM / "efivars.fd"


def _left_behind(host: Host) -> list[str]:
    """Temporary files, sockets and pidfiles anywhere in the state directory."""
    return sorted(str(p.relative_to(host.state)) for p in host.state.rglob("*")
                  if p.name.endswith((".tmp", ".partial", ".pid")) or p.is_socket())


def _assert_converged_running(host: Host) -> None:
    paths, qemu_uid = _paths(host), pwd.getpwnam("infinization-qemu").pw_uid
    assert len(host.qemu_pids(VM)) == 1 and len(_swtpms(host)) == 1, (host.qemu_pids(VM), _swtpms(host))
    qemu, tpm = procfs.find_qemu(paths), procfs.find_swtpm(paths)
    assert qemu is not None and tpm is not None, "both processes pass the identity check"
    assert [qemu.pid] == host.qemu_pids(VM) and [tpm.pid] == _swtpms(host)
    assert set(procfs.uids(qemu.pid) or ()) == set(procfs.uids(tpm.pid) or ()) == {qemu_uid}
    run = f"vms/{VM}/run"
    assert _left_behind(host) == sorted(f"{run}/{name}" for name in ("events.sock", "qemu.pid", "qmp.sock",
                                                                     "swtpm.pid", "swtpm.sock"))
    assert int(paths.pidfile.read_text()) == qemu.pid and int(paths.tpm_pidfile.read_text()) == tpm.pid
    assert sorted(p.name for p in (host.state / "disks" / VM).iterdir()) == ["efivars.fd", "efivars.fd.origin.json",
                                                                            "root.qcow2"]
    assert len(list(paths.dir.glob("cidata-*.iso"))) == 1


@pytest.mark.parametrize("moment", ["before", "after"])
@pytest.mark.parametrize("step", CREATE_STEPS)
def test_interrupted_desktop_create_converges(host: Host, step: str, moment: str) -> None:
    host.write("d.yaml", _manifest())
    _crash(host, f"{moment}:{step}")
    first = _store(host).stat().st_ino if _store(host).exists() else None

    host.apply()
    first = first or _store(host).stat().st_ino
    _assert_converged_running(host)
    report = host.guest(VM).wait_report(lambda r: r.efi and r.tpm and r.cidata is not None,
                                        what="EFI, a TPM and the seed", timeout=UEFI_TIMEOUT)
    assert report.disks.get("vda") == 64 * 1024**2
    assert host.plan_exit() == 0
    assert _store(host).stat().st_ino == first, "the variable store is never copied again"
    _assert_converged_running(host)


def _orphan_swtpm(host: Host) -> None:
    """What stop-tpm is planned for: the VM's swtpm running without its QEMU (the VM halted)."""
    host.write("d.yaml", _manifest(run_strategy="Halted"))
    host.apply()
    layout = StateLayout(host.state)
    config = HostConfig.model_validate(yaml.safe_load(host.config.read_text()))
    asyncio.run(vmprocess._start_swtpm(layout, layout.vm(VM), config))
    assert len(_swtpms(host)) == 1 and host.qemu_pids(VM) == []


@pytest.mark.parametrize("moment", ["before", "after"])
@pytest.mark.parametrize("step", [*DELETE_STEPS, "stop-tpm"])
def test_interrupted_desktop_delete_converges(host: Host, step: str, moment: str) -> None:
    if step == "stop-tpm":
        _orphan_swtpm(host)
    else:
        host.write("d.yaml", _manifest(grace=2))
        host.apply()
        assert len(host.qemu_pids(VM)) == 1 and len(_swtpms(host)) == 1
    (host.manifests / "d.yaml").unlink()
    plan = host.cli("plan", str(host.manifests), "--json", check=True).stdout
    assert f'"{step}"' in plan, plan
    _crash(host, f"{moment}:{step}", "--allow-empty")

    host.apply("--allow-empty")
    assert host.qemu_pids(VM) == [] and _swtpms(host) == []
    assert not (host.state / "vms" / VM).exists()
    assert not (host.state / "tpm" / VM).exists()
    assert not (host.state / "disks" / VM).exists(), "no variable store, no deleted disk"
    assert _left_behind(host) == []
    assert host.plan_exit() == 0
