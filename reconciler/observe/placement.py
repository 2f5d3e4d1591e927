"""Observe where a running QEMU's threads may run, and its cpuset cgroup (read-only).

Called by the snapshot builder for each running, verified QEMU. Each thread's allowed CPUs come from
``/proc/PID/task/TID/status`` (``Cpus_allowed_list``): the vCPU threads by the thread ids QMP's
``query-cpus-fast`` gave (``LiveState.vcpu_threads``), the others (QEMU's main loop, I/O workers) as the set
of distinct CPU lists they have. The cgroup is read from the hierarchy ``adapters/cgroups`` found.
"""

from __future__ import annotations

from pathlib import Path

from reconciler.adapters import cgroups
from reconciler.plan.hostfacts import CpusetHierarchy, ObservedPlacement
from reconciler.spec.placement import format_cpu_list, parse_cpu_list


def _in_cgroup(pid: int, group: Path, hierarchy: CpusetHierarchy) -> bool:
    """``/proc/PID/cgroup`` puts the process in ``group`` (in the hierarchy of the cpuset controller)."""
    relative = "/" + str(group.relative_to(hierarchy.mount))
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        _, controllers, path = line.split(":", 2)
        mine = controllers == "" if hierarchy.version == "v2" else "cpuset" in controllers.split(",")
        if mine and path == relative:
            return True
    return False


def observe_placement(pid: int, vcpu_threads: dict[int, int], vm_dir: Path,
                      hierarchy: CpusetHierarchy) -> ObservedPlacement:
    found = cgroups.threads(pid)
    vcpus = {index: found[tid][1] for index, tid in sorted(vcpu_threads.items()) if tid in found}
    vcpu_tids = set(vcpu_threads.values())
    emulator = sorted({cpus for tid, (name, cpus) in found.items()
                       if tid not in vcpu_tids and not cgroups.transient(name)})
    group = cgroups.vm_cgroup(hierarchy, vm_dir)
    if group is None or not group.is_dir():
        return ObservedPlacement(vcpus=vcpus, emulator=emulator)

    def read(name: str) -> str:
        try:
            return format_cpu_list(parse_cpu_list((group / name).read_text()))
        except (OSError, ValueError):
            return ""

    return ObservedPlacement(vcpus=vcpus, emulator=emulator, cgroup=str(group), cgroup_cpus=read("cpuset.cpus"),
                             cgroup_mems=read("cpuset.mems"), in_cgroup=_in_cgroup(pid, group, hierarchy))
