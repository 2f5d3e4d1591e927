"""Live changes on a running VM, each one seen from inside the guest, with the same QEMU throughout."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pycdlib

from tests.e2e.harness import GUEST_DIR, Host

MiB = 1024**2


def live_vm(*, disks: str = "", nics: str = "", cores: int = 1, memory: str = "256Mi", cd: str = "",
            slots: int = 4, extra: str = "") -> str:
    return f"""apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {{name: live}}
spec:
  machine: {{type: q35, accel: tcg}}
  cpu: {{cores: {cores}, maxCpus: 2}}
  memory: {{size: {memory}, maxSize: 768Mi, balloon: true}}
  hotplugSlots: {slots}
  terminationGracePeriodSeconds: 15
  boot: {{kernel: {GUEST_DIR}/vmlinuz, initrd: {GUEST_DIR}/initrd.img, cmdline: "console=ttyS0 panic=-1"}}
  disks:
    - {{name: root, size: 64Mi}}
{disks}
  networks:
    - {{name: nat, mac: "52:54:00:be:00:01"{nics and ""}}}
{nics}
  cdroms:
    - {{name: cd0{cd}}}
{extra}"""


def make_iso(path: Path, label: str) -> None:
    iso = pycdlib.PyCdlib()
    iso.new(vol_ident=label)
    iso.add_fp(__import__("io").BytesIO(b"hello\n"), 6, "/HELLO.TXT;1")
    iso.write(str(path))
    iso.close()


def test_live_changes_reach_the_guest_without_restart(host: Host) -> None:
    guest = host.guest("live")
    host.write("live.yaml", live_vm())
    host.apply()
    (pid,) = host.qemu_pids("live")
    base = guest.wait_report(lambda r: "vda" in r.disks and "eth0" in r.nics, what="boot")
    assert (base.cpus, base.cds) == (1, {"sr0": "-"})

    def step(manifest: str, predicate, what: str):  # type: ignore[no-untyped-def]
        host.write("live.yaml", manifest)
        out = host.apply().stdout
        report = guest.wait_report(predicate, what=what)
        assert host.plan_exit() == 0, f"plan not empty after: {what}"
        assert host.qemu_pids("live") == [pid], f"QEMU was restarted for: {what}"
        return out, report

    # A second disk appears (with an I/O limit the monitor then reports), then goes; its file stays.
    out, _ = step(live_vm(disks="    - {name: data, size: 32Mi, iops: 200}"),
                  lambda r: r.disks.get("vdb") == 32 * MiB, "vdb of 32Mi")
    assert "hot-plug" in out
    blocks = json.loads(host.cli("status", "--json", check=True).stdout)["vms"][0]
    assert blocks["inSync"] is True
    step(live_vm(), lambda r: "vdb" not in r.disks, "vdb gone")
    assert host.disk("live", "data").exists()

    # A NIC appears with its MAC, and disappears.
    step(live_vm(nics='    - {name: second, mac: "52:54:00:be:00:02"}'),
         lambda r: ("52:54:00:be:00:02", "up") in r.nics.values(), "the second NIC")
    step(live_vm(), lambda r: len(r.nics) == 1, "the second NIC gone")

    # Link down is seen by the guest, and up again.
    down = live_vm().replace('mac: "52:54:00:be:00:01"', 'mac: "52:54:00:be:00:01", link: down')
    step(down, lambda r: r.nics["eth0"][1] == "down", "eth0 down")
    step(live_vm(), lambda r: r.nics["eth0"][1] == "up", "eth0 up")

    # More vCPUs and more memory (a DIMM), then less memory through the balloon.
    _, more = step(live_vm(cores=2, memory="512Mi"),
                   lambda r: r.cpus == 2 and r.mem_kb > base.mem_kb + 200 * 1024, "2 cpus and +256Mi")
    step(live_vm(cores=2, memory="384Mi"), lambda r: r.mem_kb < more.mem_kb - 100 * 1024, "ballooned down")

    # A CD is inserted, changed and ejected.
    iso_a, iso_b = host.base / "a.iso", host.base / "b.iso"
    make_iso(iso_a, "INFZ_A")
    make_iso(iso_b, "INFZ_B")
    step(live_vm(cores=2, memory="384Mi", cd=f", image: {iso_a}"), lambda r: r.cds.get("sr0") == "INFZ_A", "CD A")
    step(live_vm(cores=2, memory="384Mi", cd=f", image: {iso_b}"), lambda r: r.cds.get("sr0") == "INFZ_B", "CD B")
    step(live_vm(cores=2, memory="384Mi"), lambda r: r.cds.get("sr0") == "-", "CD ejected")


def test_hotplug_budget_is_refused_before_anything_changes(host: Host) -> None:
    host.write("live.yaml", live_vm(slots=1))
    host.apply()
    (pid,) = host.qemu_pids("live")
    two = "    - {name: a, size: 16Mi}\n    - {name: b, size: 16Mi}"
    host.write("live.yaml", live_vm(slots=1, disks=two))
    done = host.apply(check=False)
    assert done.returncode == 1
    assert "2 device(s) to hot-plug but only 1 free hot-plug slot(s)" in done.stdout
    assert not host.disk("live", "a").exists(), "a refused plan must not start half-way"
    assert host.qemu_pids("live") == [pid]


def test_unplug_the_guest_ignores_stays_pending_until_reset(host: Host) -> None:
    # No guest OS (firmware only): nothing answers the ACPI unplug request.
    firmware_only = """apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {{name: nogos}}
spec:
  machine: {{type: q35, accel: tcg}}
  memory: {{size: 128Mi}}
  terminationGracePeriodSeconds: 1
  disks:
    - {{name: root, size: 16Mi}}
{more}"""
    host.write("v.yaml", firmware_only.format(more="    - {name: extra, size: 16Mi}"))
    host.apply()
    (pid,) = host.qemu_pids("nogos")
    host.write("v.yaml", firmware_only.format(more=""))
    done = host.apply(check=False)
    assert "unplug pending" in done.stdout
    status = json.loads(host.cli("status", "--json", check=True).stdout)["vms"][0]
    assert status["unplugPending"] and "disk extra" in status["unplugPending"][0]
    assert host.plan_exit() == 2, "a pending unplug is not converged"

    # A reset completes the unplug in QEMU; the next apply removes the backend and converges.
    subprocess.run([__import__("sys").executable, "-c", (
        "import asyncio;from pathlib import Path;from reconciler.adapters import monitor\n"
        "async def m():\n"
        f"  async with monitor.session(Path('{host.state}/vms/nogos/run/qmp.sock')) as q:\n"
        "    await q.execute('system_reset')\n"
        "asyncio.run(m())")], check=True)
    host.apply()
    assert host.plan_exit() == 0
    assert host.qemu_pids("nogos") == [pid]
    assert host.disk("nogos", "extra").exists()
