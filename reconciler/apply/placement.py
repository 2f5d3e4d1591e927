"""Put a running QEMU's threads where the plan says, give it its cpuset cgroup, and remove that cgroup.

Called by the executor for a ``set-placement`` step (after a start, on drift, on a placement change, after
vCPUs were added) and by ``apply.vmprocess`` when QEMU stops or the VM is forgotten. The order matters:
a process moved into a cpuset cgroup, or a cgroup whose ``cpuset.cpus`` is written, has every thread's
affinity reset to the cgroup's CPUs by the kernel, so the cgroup comes first and the per-thread affinity
(``sched_setaffinity`` on each thread id, which root may do on QEMU's unprivileged threads) after it. The
vCPU thread ids are asked from QMP (``query-cpus-fast``) when the step runs, never taken from the plan:
they change with every start. What was set is read back from /proc and checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from pathlib import Path

from reconciler.adapters import cgroups, procfs
from reconciler.adapters.monitor import Monitor
from reconciler.errors import StepFailed
from reconciler.plan import steps as s
from reconciler.plan.hostfacts import CpusetHierarchy
from reconciler.spec.models import VirtualMachineSpec
from reconciler.spec.placement import format_cpu_list, parse_cpu_list
from reconciler.state import files
from reconciler.state.layout import VMPaths
from reconciler.state.models import AppliedRecord

TRIES = 3
REMOVE_WAIT = 5.0
POLL = 0.02


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(f"{value}\n")
    except OSError as exc:
        raise StepFailed(f"cannot write {value!r} to {path}: {exc.strerror or exc}") from exc


def _prepare_slice(hierarchy: CpusetHierarchy) -> Path:
    """``infinization.slice`` in the cpuset hierarchy, able to hold cpuset children."""
    root = Path(hierarchy.mount)
    slice_dir = root / cgroups.SLICE
    slice_dir.mkdir(mode=0o755, exist_ok=True)
    if hierarchy.version == "v2":
        for parent in (root, slice_dir):  # the controller must be on in each parent's subtree
            if "cpuset" not in (parent / "cgroup.subtree_control").read_text().split():
                _write(parent / "cgroup.subtree_control", "+cpuset")
    else:  # v1: a child's cpuset starts empty, and cannot hold a task until both files are set
        for name in ("cpuset.mems", "cpuset.cpus"):
            if not (slice_dir / name).read_text().strip():
                _write(slice_dir / name, (root / name).read_text().strip())
    return slice_dir


def _join(hierarchy: CpusetHierarchy, paths: VMPaths, pid: int, cpus: str, mems: str) -> Path:
    """Create (or reuse) the VM's cgroup with this cpuset and move QEMU into it (all its threads)."""
    group = _prepare_slice(hierarchy) / cgroups.scope_name(paths.dir)
    for attempt in range(TRIES):  # another instance's sweep may remove an empty group between mkdir and join
        group.mkdir(mode=0o755, exist_ok=True)
        try:
            # v1: a cgroup whose mems or cpus is empty refuses tasks, so both are written before the join.
            if hierarchy.version == "v1":  # move QEMU's memory to the new nodes too (v2 always does)
                (group / "cpuset.memory_migrate").write_text("1\n")
            (group / "cpuset.mems").write_text(f"{mems}\n")
            (group / "cpuset.cpus").write_text(f"{cpus}\n")
            (group / "cgroup.procs").write_text(f"{pid}\n")
            return group
        except OSError as exc:
            if exc.errno != errno.ENOENT or attempt == TRIES - 1:
                raise StepFailed(f"cannot put QEMU pid {pid} into {group} (cpus {cpus}, mems {mems}): "
                                 f"{exc.strerror or exc}") from exc
    raise AssertionError("unreachable")


def launch_cpus(spec: VirtualMachineSpec, record: AppliedRecord | None) -> str | None:
    """The CPUs a pinned VM's QEMU may start on, when they are known before it runs (a cpuSet, or a strategy's
    recorded choice, with the emulator's CPUs), among those we may use ourselves: so it never runs on another
    VM's CPUs, not even before its set-placement step. None: unpinned, or a first start by a strategy."""
    placement = spec.cpu.placement
    if placement is None:
        return None
    pool = set(placement.cpus) if placement.cpus is not None else set(record.placement_cpus if record else ())
    if not pool:
        return None
    cpus = (pool | set(parse_cpu_list(placement.emulatorCpuSet or ""))) & os.sched_getaffinity(0)
    return format_cpu_list(cpus) if cpus else None


def _pin_threads(pid: int, vcpu_threads: dict[int, int], step: s.SetPlacement) -> tuple[int, int]:
    """sched_setaffinity on every thread of QEMU; how many vCPU and other threads were set."""
    per_thread: dict[int, set[int]] = {}
    emulator = parse_cpu_list(step.emulator)
    for index, tid in vcpu_threads.items():
        per_thread.setdefault(tid, set()).update(parse_cpu_list(step.vcpus[index]) if index in step.vcpus
                                                 else emulator)
    others = 0
    for tid in cgroups.thread_cpus(pid):
        with contextlib.suppress(ProcessLookupError):  # a worker thread that just ended
            os.sched_setaffinity(tid, per_thread.get(tid, emulator))
            others += tid not in per_thread
    return len(per_thread), others


def _check(pid: int, vcpu_threads: dict[int, int], step: s.SetPlacement) -> None:
    """Read the affinities back (a kernel that narrowed them, e.g. CPUs outside the cgroup, is an error)."""
    have = cgroups.thread_cpus(pid)
    for index, tid in sorted(vcpu_threads.items()):
        want = step.vcpus.get(index, step.emulator)
        shared = [i for i, t in vcpu_threads.items() if t == tid]
        if len(shared) > 1:
            want = format_cpu_list(set().union(*(parse_cpu_list(step.vcpus.get(i, step.emulator)) for i in shared)))
        if tid in have and have[tid] != want:
            raise StepFailed(f"vCPU {index} (thread {tid}) runs on {have[tid]} after pinning it to {want}")


async def apply(qmp: Monitor, paths: VMPaths, step: s.SetPlacement) -> str:
    """Pin the VM's running QEMU as ``step`` says; what was done."""
    process = procfs.find_qemu(paths)
    if process is None:
        raise StepFailed("its QEMU is not running (or not verified): nothing to pin")
    vcpu_threads = {int(c["cpu-index"]): int(c["thread-id"]) for c in await qmp.execute("query-cpus-fast")
                    if "thread-id" in c}
    where = "no cpuset cgroup"
    if step.cgroup_cpus is not None:
        hierarchy = cgroups.cpuset_hierarchy()
        if hierarchy.version is None:
            raise StepFailed(f"cannot confine QEMU to CPUs {step.cgroup_cpus}: {hierarchy.detail}")
        group = _join(hierarchy, paths, process.pid, step.cgroup_cpus, step.cgroup_mems)
        where = f"cgroup {group} (cpus {step.cgroup_cpus}, mems {step.cgroup_mems})"
    vcpus, others = _pin_threads(process.pid, vcpu_threads, step)
    _check(process.pid, vcpu_threads, step)
    if step.chosen:
        files.record_placement(paths, step.chosen)
    return f"{vcpus} vCPU thread(s) and {others} other thread(s) pinned; {where}"


def _mounts() -> list[Path]:
    """The hierarchies a VM's cgroups may be in: cgroup v2 (grouping), the cpuset one and the cpu one (v1 on
    hybrid hosts)."""
    hierarchy = cgroups.cpuset_hierarchy()
    cpu = cgroups.cpu_weight_mount()
    found = {cgroups.cgroup2_mount(), Path(hierarchy.mount) if hierarchy.version else None, cpu[1] if cpu else None}
    return sorted(mount for mount in found if mount is not None)


async def remove_cgroups(paths: VMPaths, wait: float = REMOVE_WAIT) -> None:
    """Remove the VM's cgroups once its QEMU is gone. A QEMU that just exited can keep its cgroup busy for a
    moment (until its parent reaps it), so a busy one is retried within ``wait``."""
    deadline = time.monotonic() + wait
    for mount in _mounts():
        group = mount / cgroups.SLICE / cgroups.scope_name(paths.dir)
        while True:
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    break  # still populated: a QEMU runs in it (never ours to remove), or swept at a later start
                await asyncio.sleep(POLL)


def sweep_empty() -> None:
    """Remove the empty VM cgroups of QEMUs that died or were killed (the kernel refuses populated ones)."""
    for mount in _mounts():
        for old in sorted((mount / cgroups.SLICE).glob("vm-*.scope")):
            with contextlib.suppress(OSError):
                old.rmdir()
