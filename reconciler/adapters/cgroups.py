"""Where a VM's QEMU cgroup lives, and reading the host's CPU, NUMA, hugepage and cgroup facts.

Shared by the observer (which only reads) and the executor (which creates, fills and removes the cgroups).
Each VM's QEMU gets ``infinization.slice/vm-NAME-HASH.scope`` (HASH: 12 hex of the VM's state folder,
because two state directories on one host may both hold a VM called ``web``): in the cgroup v2 hierarchy
(grouping only, or with ``cpuset.cpus``/``cpuset.mems`` where v2 has the cpuset controller), and, on a
hybrid host whose cpuset controller is a v1 hierarchy of its own (``/sys/fs/cgroup/cpuset``), under that
hierarchy too, for the cpuset; likewise for the ``cpu`` controller, so that all VMs together weigh as much as
one other top-level cgroup (what systemd's ``machine.slice`` does for libvirt): booting guests cannot starve
the reconciler, or anything else on the host, of CPU. The cgroups are made directly under the mounts: no
systemd is needed (none may run, as in containers), and nothing else names these directories.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from reconciler.plan.hostfacts import CpusetHierarchy, HugepagePool, HugetlbMount, ObservedCpuHost
from reconciler.spec.placement import format_cpu_list, parse_cpu_list

SLICE = "infinization.slice"
MOUNTS = Path("/proc/mounts")
SYS_NODES = Path("/sys/devices/system/node")
SYS_CPU_ONLINE = Path("/sys/devices/system/cpu/online")
SYS_HUGEPAGES = Path("/sys/kernel/mm/hugepages")


def scope_name(vm_dir: Path) -> str:
    """``vm-NAME-HASH.scope`` for the VM whose state folder is ``vm_dir``."""
    digest = hashlib.sha256(str(vm_dir).encode()).hexdigest()[:12]
    return f"vm-{vm_dir.name[:40]}-{digest}.scope"


def _mounts() -> list[list[str]]:
    try:
        return [line.split() for line in MOUNTS.read_text().splitlines()]
    except OSError:
        return []


def cgroup2_mount() -> Path | None:
    """The cgroup v2 hierarchy's mount point (``/sys/fs/cgroup``, or ``/sys/fs/cgroup/unified`` on a hybrid host)."""
    return next((Path(f[1]) for f in _mounts() if f[2:3] == ["cgroup2"]), None)


def _controller_mount(controller: str) -> tuple[Literal["v1", "v2"], Path] | None:
    """Where ``controller`` can be used: ("v2", mount) when the v2 root lists it in ``cgroup.controllers``, else
    ("v1", mount) of a v1 hierarchy holding it (alone or co-mounted, as ``cpu,cpuacct``); None when neither."""
    v2 = cgroup2_mount()
    if v2 is not None:
        try:
            if controller in (v2 / "cgroup.controllers").read_text().split():
                return "v2", v2
        except OSError:
            pass
    for fields in _mounts():
        if fields[2:3] == ["cgroup"] and controller in fields[3].split(","):
            return "v1", Path(fields[1])
    return None


def cpuset_hierarchy() -> CpusetHierarchy:
    """Where the cpuset controller can be used: v2 when the v2 root lists it, else a v1 ``cpuset`` mount."""
    found = _controller_mount("cpuset")
    if found is not None:
        return CpusetHierarchy(version=found[0], mount=str(found[1]))
    v2 = cgroup2_mount()
    where = f"the cgroup v2 hierarchy at {v2} does not list it in cgroup.controllers" if v2 else "no cgroup v2 mount"
    return CpusetHierarchy(detail=f"no cpuset cgroup controller ({where}, and no cgroup v1 cpuset mount)")


def cpu_weight_mount() -> tuple[Literal["v1", "v2"], Path] | None:
    """Where the ``cpu`` controller (CPU weight) can be used (see ``_controller_mount``)."""
    return _controller_mount("cpu")


def vm_cgroup(hierarchy: CpusetHierarchy, vm_dir: Path) -> Path | None:
    return Path(hierarchy.mount) / SLICE / scope_name(vm_dir) if hierarchy.version else None


def threads(pid: int) -> dict[int, tuple[str, str]]:
    """Thread id -> (its name, its allowed CPUs: ``Cpus_allowed_list``, canonical), for every thread of ``pid``
    still there: one read of ``/proc/PID/task/TID/status`` each (its ``Name:`` is the thread's ``comm``)."""
    found: dict[int, tuple[str, str]] = {}
    try:
        tasks = sorted(int(entry.name) for entry in Path(f"/proc/{pid}/task").iterdir() if entry.name.isdigit())
    except OSError:
        return found
    for tid in tasks:
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue  # a worker thread that ended meanwhile
        name = ""
        for line in status.splitlines():
            if line.startswith("Name:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("Cpus_allowed_list:"):
                found[tid] = (name, format_cpu_list(parse_cpu_list(line.split(":", 1)[1])))
                break
    return found


def transient(name: str) -> bool:
    """QEMU's thread-pool workers (``-name debug-threads=on`` names them ``worker``): they come and go, and take
    the CPUs of whichever thread made them (a vCPU thread too), so they are pinned but never judged as drift."""
    return name == "worker"


def thread_cpus(pid: int) -> dict[int, str]:
    """Thread id -> its allowed CPUs (``Cpus_allowed_list``, canonical), for every thread of ``pid`` still there."""
    return {tid: cpus for tid, (_name, cpus) in threads(pid).items()}


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _hugepage_pools() -> dict[int, HugepagePool]:
    pools = {}
    for entry in sorted(SYS_HUGEPAGES.glob("hugepages-*kB")):
        size = int(entry.name.removeprefix("hugepages-").removesuffix("kB"))
        numbers = {name: int(_read(entry / name) or 0) for name in ("nr_hugepages", "free_hugepages",
                                                                   "resv_hugepages")}
        pools[size] = HugepagePool(total=numbers["nr_hugepages"], free=numbers["free_hugepages"],
                                   reserved=numbers["resv_hugepages"])
    return pools


def _hugetlbfs() -> list[HugetlbMount]:
    found = []
    for fields in _mounts():
        if fields[2:3] != ["hugetlbfs"]:
            continue
        options = dict(opt.partition("=")[::2] for opt in fields[3].split(","))
        size = options.get("pagesize", "2M")
        kib = int(size[:-1]) * (1024 * 1024 if size.endswith("G") else 1024) if size[:-1].isdigit() else 0
        try:
            stat = os.stat(fields[1])
        except OSError:
            continue
        found.append(HugetlbMount(path=fields[1], pagesize_kb=kib, uid=stat.st_uid, mode=stat.st_mode & 0o7777))
    return found


def _nodes() -> tuple[dict[int, list[int]], list[int]]:
    nodes: dict[int, list[int]] = {}
    for entry in sorted(SYS_NODES.glob("node[0-9]*")):
        nodes[int(entry.name[4:])] = sorted(parse_cpu_list(_read(entry / "cpulist")))
    memory = sorted(parse_cpu_list(_read(SYS_NODES / "has_memory"))) if (SYS_NODES / "has_memory").exists() \
        else sorted(nodes)
    return nodes, memory


def read_cpu_host() -> ObservedCpuHost:
    """The host's CPUs online, NUMA nodes, hugepage pools, hugetlbfs mounts and cpuset hierarchy (read-only)."""
    nodes, memory = _nodes()
    online = sorted(parse_cpu_list(_read(SYS_CPU_ONLINE)))
    if not nodes:  # a kernel without NUMA support: one node with every CPU
        nodes, memory = {0: online}, [0]
    return ObservedCpuHost(read=True, online=online, nodes={n: [c for c in cpus if c in online]
                                                              for n, cpus in nodes.items()},
                           memory_nodes=memory, hugepages=_hugepage_pools(), hugetlbfs=_hugetlbfs(),
                           cpuset=cpuset_hierarchy())
