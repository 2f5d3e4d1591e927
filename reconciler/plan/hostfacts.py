"""Facts about the host's CPUs and memory that placement and hugepages depend on, and about where a running
QEMU's threads may run: frozen snapshots filled by ``observe/hostcpu.py`` (read-only) and judged by the pure
``plan/placement.py``.

Host facts: the CPUs online, the NUMA nodes (their CPUs, whether they have memory), each hugepage pool
(``/sys/kernel/mm/hugepages``), the hugetlbfs mounts, and which cgroup hierarchy has the cpuset controller.
Per QEMU: the affinity of each vCPU thread (its thread id from QMP ``query-cpus-fast``), the distinct
affinities of its other threads (worker threads come and go, so their ids are left out: a saved plan does
not go stale because QEMU started an I/O worker), and its cpuset cgroup.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Fact(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HugepagePool(_Fact):
    """One hugepage size's pool, from /sys/kernel/mm/hugepages/hugepages-<size>kB."""

    total: int = 0
    free: int = 0
    reserved: int = Field(default=0, description="Promised to a mapping but not faulted in yet (not free).")


class HugetlbMount(_Fact):
    path: str
    pagesize_kb: int
    uid: int
    mode: int


class CpusetHierarchy(_Fact):
    """Where the cpuset controller is: a cgroup v2 hierarchy that lists it, or a v1 hierarchy of its own."""

    version: Literal["v1", "v2"] | None = None
    mount: str = ""
    detail: str = Field(default="", description="Why there is none (shown in the plan's refusal).")


class ObservedCpuHost(_Fact):
    read: bool = Field(default=False, description="The observer read these facts (False: an offline recording "
                       "without them; the planner then refuses what needs them).")
    online: list[int] = Field(default_factory=list, description="Host CPUs online.")
    nodes: dict[int, list[int]] = Field(default_factory=dict, description="NUMA node -> its CPUs online.")
    memory_nodes: list[int] = Field(default_factory=list, description="NUMA nodes with memory.")
    hugepages: dict[int, HugepagePool] = Field(default_factory=dict, description="Page size in KiB -> pool.")
    hugetlbfs: list[HugetlbMount] = Field(default_factory=list)
    cpuset: CpusetHierarchy = Field(default_factory=CpusetHierarchy)


class ObservedPlacement(_Fact):
    """Where a running QEMU's threads may run (/proc/PID/task/*/status: Cpus_allowed_list) and its cgroup."""

    vcpus: dict[int, str] = Field(default_factory=dict, description="vCPU index -> its thread's CPU list.")
    emulator: list[str] = Field(default_factory=list, description="The other threads' CPU lists, distinct.")
    cgroup: str | None = Field(default=None, description="The VM's cpuset cgroup directory, when it exists.")
    cgroup_cpus: str = ""
    cgroup_mems: str = ""
    in_cgroup: bool = Field(default=False, description="QEMU's process is in that cgroup.")
