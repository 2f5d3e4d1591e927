"""CPU placement and hugepages on real QEMU (TCG), proven on the host (the guest cannot see its affinity).

vCPU threads are found by the names QEMU gives them (``-name debug-threads=on``: ``CPU 0/TCG``), not by the
reconciler's own QMP query, and their allowed CPUs are read from /proc; the cgroup from /proc/PID/cgroup and
the cgroup's own files; hugepage use from /proc/meminfo. The guest reports that it still runs with all its
vCPUs, and its memory size when that memory is on hugepages.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.adapters.cgroups import scope_name
from tests.e2e.harness import GUEST_DIR, Host, live_processes

MEMINFO = Path("/proc/meminfo")
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def manifest(name: str, cpu: str, memory: str = "{size: 256Mi}") -> str:
    return f"""apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {{name: {name}}}
spec:
  machine: {{type: q35, accel: tcg}}
  cpu: {cpu}
  memory: {memory}
  terminationGracePeriodSeconds: 5
  boot: {{kernel: {GUEST_DIR}/vmlinuz, initrd: {GUEST_DIR}/initrd.img, cmdline: "console=ttyS0 panic=-1"}}
  networks:
    - {{name: nat, type: user}}
"""


def threads(pid: int) -> dict[str, list[tuple[int, str]]]:
    """Thread name -> [(tid, Cpus_allowed_list)] of a process, from /proc."""
    found: dict[str, list[tuple[int, str]]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
            found.setdefault((task / "comm").read_text().strip(), []).append((int(task.name),
                                                                             status["Cpus_allowed_list"].strip()))
    return found


def placement_of(pid: int) -> tuple[dict[int, str], set[str]]:
    """vCPU index -> its thread's CPUs, and the CPU lists of QEMU's other threads."""
    vcpus, others = {}, set()
    for name, entries in threads(pid).items():
        for _, cpus in entries:
            if name.startswith("CPU ") and name.endswith("/TCG"):
                vcpus[int(name.split()[1].split("/")[0])] = cpus
            else:
                others.add(cpus)
    return vcpus, others


def vcpu_tid(pid: int, index: int) -> int:
    return threads(pid)[f"CPU {index}/TCG"][0][0]


V2_CONTROLLERS = Path("/sys/fs/cgroup/cgroup.controllers")
SLICES = [Path("/sys/fs/cgroup/cpuset/infinization.slice"), Path("/sys/fs/cgroup/unified/infinization.slice"),
          Path("/sys/fs/cgroup/infinization.slice"), Path("/sys/fs/cgroup/cpu/infinization.slice"),
          Path("/sys/fs/cgroup/cpu,cpuacct/infinization.slice")]


def v2_cpuset() -> bool:
    return V2_CONTROLLERS.exists() and "cpuset" in V2_CONTROLLERS.read_text().split()


def has_cpuset() -> bool:
    return v2_cpuset() or Path("/sys/fs/cgroup/cpuset/cpuset.cpus").exists()


def cpuset_cgroup(pid: int) -> Path | None:
    """The cpuset cgroup directory the process is in (the v1 cpuset hierarchy, or v2 when it has cpuset)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpuset" in controllers.split(","):
            return Path("/sys/fs/cgroup/cpuset") / path.lstrip("/")
        if controllers == "" and v2_cpuset():
            return Path("/sys/fs/cgroup") / path.lstrip("/")
    return None


def _reported_since(host: Host, vm: str, since: float) -> bool:
    status = host.stored_status(vm)
    return status is not None and (status.last_reconcile or 0) > since


@pytest.fixture(autouse=True)
def _no_cgroup_left(host: Host) -> Iterator[None]:
    """VMs the test harness kills (not deleted through the reconciler) leave empty cgroups until the next start
    sweeps them: remove this host's ones here, once their QEMUs are gone."""
    yield
    host.kill_all()
    vms = host.state / "vms"
    names = [entry.name for entry in vms.iterdir()] if vms.is_dir() else []
    scopes = [slice_dir / scope_name(vms / name) for slice_dir in SLICES for name in names]
    host.wait_for(lambda: not [s for s in scopes if s.exists() and subprocess.run(["rmdir", str(s)]).returncode],
                  "this test's cgroups removed", 10)


def test_vcpu_threads_pinned_repinned_live_and_after_a_hand_made_taskset(host: Host) -> None:
    assert os.cpu_count() and os.cpu_count() >= 2, "this test pins two vCPUs to two host CPUs"  # type: ignore[operator]
    guest = host.guest("placed")
    first = '{cores: 2, placement: {cpuSet: "0-1", vcpuPins: {0: 1, 1: 0}, emulatorCpuSet: "0"}}'
    host.write("placed.yaml", manifest("placed", first))
    out = host.apply().stdout
    assert "pin threads: vCPU 0 -> 1, vCPU 1 -> 0; emulator -> 0" in out
    (pid,) = host.qemu_pids("placed")
    assert guest.wait_report(lambda r: r.cpus == 2, what="boot with 2 vCPUs").cpus == 2
    assert placement_of(pid) == ({0: "1", 1: "0"}, {"0"})
    group = cpuset_cgroup(pid) if has_cpuset() else None
    if has_cpuset():
        assert group is not None and group.parent.name == "infinization.slice" and group.name.startswith("vm-placed-")
        assert (group / "cpuset.cpus").read_text().strip() == "0-1"
        assert (group / "cpuset.mems").read_text().strip() == "0"
    assert host.plan_exit() == 0
    shown = json.loads(host.cli("status", "--json", check=True).stdout)["vms"][0]["placement"]
    assert shown["vcpus"] == {"0": "1", "1": "0"} and shown["emulator"] == ["0"]

    # The manifest changes: re-pinned live, same QEMU.
    host.write("placed.yaml", manifest("placed", first.replace("{0: 1, 1: 0}", "{0: 0, 1: 1}")
                                       .replace('emulatorCpuSet: "0"', 'emulatorCpuSet: "1"')))
    out = host.apply().stdout
    assert "placement changed" in out
    assert host.qemu_pids("placed") == [pid]
    assert placement_of(pid) == ({0: "0", 1: "1"}, {"1"})
    assert host.plan_exit() == 0

    # A vCPU thread and QEMU's main thread moved by hand: drift, shown by the plan and repaired by apply.
    subprocess.run(["taskset", "-p", "-c", "0-1", str(vcpu_tid(pid, 0))], check=True, capture_output=True)
    subprocess.run(["taskset", "-p", "-c", "0", str(pid)], check=True, capture_output=True)
    plan = host.cli("plan", str(host.manifests), "--detailed-exitcode")
    assert plan.returncode == 2, plan.stdout
    assert f"vCPU 0 (thread {vcpu_tid(pid, 0)}) may run on 0-1, not 0" in plan.stdout
    assert "emulator threads may run on 0, not 1" in plan.stdout
    host.apply()
    assert placement_of(pid) == ({0: "0", 1: "1"}, {"1"})
    assert host.plan_exit() == 0

    # The sync daemon repairs it too, on its full resync (moving a thread sends no event): with the periodic one
    # an hour away, SIGHUP runs it now.
    launched = time.time()
    daemon = host.start_sync("--resync-interval", "3600")
    try:
        host.wait_for(lambda: _reported_since(host, "placed", launched), "the daemon's first pass", 120)
        subprocess.run(["taskset", "-p", "-c", "1", str(vcpu_tid(pid, 0))], check=True, capture_output=True)
        daemon.send_signal(signal.SIGHUP)
        host.wait_for(lambda: placement_of(pid) == ({0: "0", 1: "1"}, {"1"}), "the daemon to re-pin vCPU 0", 60)
    finally:
        assert host.stop_sync(daemon) == 0
    assert host.qemu_pids("placed") == [pid]
    last = guest.reports()[-1]
    assert last.cpus == 2, "the guest still runs with all its vCPUs"

    # Placement removed: every thread may use every CPU again (and the cgroup's cpuset is widened), live.
    host.write("placed.yaml", manifest("placed", "{cores: 2}"))
    assert "(unpin)" in host.apply().stdout
    assert host.qemu_pids("placed") == [pid]
    assert placement_of(pid) == ({0: "0-1", 1: "0-1"}, {"0-1"})
    if group is not None:
        assert (group / "cpuset.cpus").read_text().strip() == "0-1"
    assert host.plan_exit() == 0

    # Deleted: its cgroups are gone with it.
    (host.manifests / "placed.yaml").unlink()
    host.apply("--allow-empty")
    assert host.qemu_pids("placed") == []
    if group is not None:
        assert not group.exists()
    if group is not None:
        assert not [slice_dir / group.name for slice_dir in SLICES if (slice_dir / group.name).exists()]


def test_strategies_never_share_cpus_and_keep_their_choice(host: Host) -> None:
    host.write("a.yaml", manifest("sa", "{cores: 1, placement: {strategy: basic}}"))
    host.write("b.yaml", manifest("sb", "{cores: 1, placement: {strategy: spread, seed: 3}}"))
    out = host.apply().stdout
    (pa,), (pb,) = host.qemu_pids("sa"), host.qemu_pids("sb")
    (cpu_a,), (cpu_b,) = placement_of(pa)[0].values(), placement_of(pb)[0].values()
    assert {cpu_a, cpu_b} == {"0", "1"}, "two pinned VMs on two CPUs: one each"
    assert f"(chosen by the strategy: {cpu_a})" in out and f"(chosen by the strategy: {cpu_b})" in out
    assert host.plan_exit() == 0, "the choice is recorded: the next plan is empty"

    # A third one finds no free CPU: refused at plan time, naming the CPUs taken; with shareCpus it may share.
    host.write("c.yaml", manifest("sc", "{cores: 1, placement: {strategy: basic}}"))
    plan = host.cli("plan", str(host.manifests))
    assert plan.returncode == 1
    assert "strategy basic needs 1 host CPU(s) no other pinned VM uses; 0 free" in plan.stdout
    assert f"{cpu_a} by sa" in plan.stdout and f"{cpu_b} by sb" in plan.stdout
    assert host.qemu_pids("sc") == []
    host.write("c.yaml", manifest("sc", "{cores: 1, placement: {strategy: basic, shareCpus: true}}"))
    host.apply()
    (pc,) = host.qemu_pids("sc")
    assert placement_of(pc)[0] == {0: "0"}
    assert host.qemu_pids("sa") == [pa] and host.qemu_pids("sb") == [pb]
    assert host.plan_exit() == 0


def _meminfo(field: str) -> int:
    return next(int(line.split()[1]) for line in MEMINFO.read_text().splitlines() if line.startswith(field + ":"))


@pytest.fixture
def hugepages(host: Host) -> Iterator[Path]:
    """224 more 2 MiB pages reserved for the test, and a private hugetlbfs directory under the test's folder;
    both undone afterwards (QEMU killed first: a mapped page keeps the mount busy)."""
    before = int(NR_HUGEPAGES.read_text())
    NR_HUGEPAGES.write_text(f"{before + 224}\n")
    directory = host.base / "hugepages"
    host.config.write_text(host.config.read_text() + f"hugepagesDir: {directory}\n")
    try:
        yield directory
    finally:
        host.kill_all()
        host.wait_for(lambda: not live_processes(lambda c: str(host.base).encode() in c), "QEMU gone", 30)
        mounted = [d for d in (directory / "2M", directory / "1G") if os.path.ismount(d)]
        for mount in mounted:  # a QEMU in the middle of exiting can still hold it for a moment: poll
            host.wait_for(lambda m=mount: subprocess.run(["umount", str(m)], capture_output=True).returncode == 0,
                          f"umount {mount}", 10)
        NR_HUGEPAGES.write_text(f"{before}\n")


def test_memory_on_hugepages_and_too_few_refused_at_plan(host: Host, hugepages: Path) -> None:
    free_before = _meminfo("HugePages_Free")
    assert free_before >= 192, "the fixture reserved 224 pages"
    host.write("h.yaml", manifest("huge", "{cores: 1}", "{size: 256Mi, maxSize: 384Mi, hugepages: true}"))
    host.apply()
    (pid,) = host.qemu_pids("huge")
    report = host.guest("huge").wait_report(lambda r: r.mem_kb > 0, what="boot")
    assert 128 * 1024 < report.mem_kb <= 256 * 1024, "the guest sees its 256Mi (less what its kernel keeps)"
    assert _meminfo("HugePages_Free") <= free_before - 128, "QEMU's 256Mi came out of the hugepage pool"
    mount = next(line.split() for line in Path("/proc/mounts").read_text().splitlines()
                 if line.split()[1] == str(hugepages / "2M"))
    assert mount[2] == "hugetlbfs" and "mode=700" in mount[3]
    assert f"mem-path\":\"{hugepages / '2M'}" in Path(f"/proc/{pid}/cmdline").read_bytes().decode().replace("\0", " ")

    # A DIMM added live is backed by hugepages too (128Mi: the guest onlines memory in 128Mi blocks).
    free_now = _meminfo("HugePages_Free")
    host.write("h.yaml", manifest("huge", "{cores: 1}", "{size: 384Mi, maxSize: 384Mi, hugepages: true}"))
    out = host.apply().stdout
    assert "on hugepages" in out
    assert host.qemu_pids("huge") == [pid]
    host.guest("huge").wait_report(lambda r: r.mem_kb >= report.mem_kb + 120 * 1024, what="the 128Mi DIMM")
    assert _meminfo("HugePages_Free") <= free_now - 64

    # More than is free: refused at plan time, with a clear message, and nothing started.
    host.write("big.yaml", manifest("bigger", "{cores: 1}", "{size: 1Gi, hugepages: true}"))
    plan = host.cli("plan", str(host.manifests))
    assert plan.returncode == 1
    assert "spec.memory.hugepages: the guest's memory (1Gi) needs 512 free 2Mi hugepages, the host has" in plan.stdout
    applied = host.apply(check=False)
    assert applied.returncode != 0 and host.qemu_pids("bigger") == []


def cpu_cgroup(pid: int) -> Path | None:
    """The directory of the process's cgroup in the ``cpu`` controller: a v1 hierarchy holding ``cpu``, else v2
    when its root lists the controller."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            mount = next(Path(m) for m in (f"/sys/fs/cgroup/{controllers}", "/sys/fs/cgroup/cpu") if Path(m).is_dir())
            return mount / path.lstrip("/")
        if controllers == "" and V2_CONTROLLERS.exists() and "cpu" in V2_CONTROLLERS.read_text().split():
            return Path("/sys/fs/cgroup") / path.lstrip("/")
    return None


def test_every_qemu_is_weighed_under_the_slice_in_the_cpu_controller(host: Host) -> None:
    """All guests together weigh as one top-level cgroup (systemd's machine.slice does this for libvirt):
    QEMU runs in its scope under ``infinization.slice`` in the ``cpu`` controller; deleting the VM removes it."""
    host.write("weighed.yaml", manifest("weighed", "{cores: 1}"))
    host.apply()
    (pid,) = host.qemu_pids("weighed")
    group = cpu_cgroup(pid)
    if group is None:
        pytest.skip("this host has no cpu cgroup controller")
    assert group.parent.name == "infinization.slice" and group.name.startswith("vm-weighed-")
    assert str(pid) in (group / "cgroup.procs").read_text().split()
    (host.manifests / "weighed.yaml").unlink()
    host.apply("--allow-empty")
    assert host.qemu_pids("weighed") == [] and not group.exists(), "the VM's cpu cgroup is removed with it"
