"""CPU placement and hugepages: which host CPUs each VM's threads get, drift, and the host's prerequisites.

Pure (no I/O): judged from ``ObservedCpuHost`` (CPUs online, NUMA nodes, hugepage pools, the cpuset
hierarchy), each running QEMU's ``ObservedPlacement`` and the last-applied records. Called by the planner:
``choose_all`` once per plan (the strategies), ``plan_vm`` per VM (refusals, the ``set-placement`` step and
the CPUs chosen to record), ``hugepage_refusal`` before a start or a DIMM on hugepages.

A strategy picks one host CPU per vCPU when ``cpuSet`` is absent. The choice is recorded
(``AppliedRecord.placement_cpus``) and kept while it is still valid, so it is stable across plans, restarts
and other VMs coming and going; new choices avoid every CPU another pinned VM has (its cpuSet or its
recorded choice) unless the VM says ``shareCpus: true``. ``basic`` is NUMA-local and sequential; ``spread``
goes round-robin over the NUMA nodes in a seeded order. VMs are chosen for in name order, those with a
valid recorded choice first, so the result depends only on the inputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.plan import steps as s
from reconciler.plan.actions import FieldChange, Mode
from reconciler.plan.fields import rule_for
from reconciler.plan.hostfacts import ObservedCpuHost, ObservedPlacement
from reconciler.plan.observed import ObservedProcess, ObservedState
from reconciler.spec.host import HostConfig
from reconciler.spec.models import MemorySpec, VirtualMachine, VirtualMachineSpec
from reconciler.spec.placement import CpuPlacement, format_cpu_list, parse_cpu_list
from reconciler.spec.units import format_size
from reconciler.state.models import AppliedRecord

HUGEPAGE_HELP = "reserve them with `echo N > /proc/sys/vm/nr_hugepages` (or at boot: hugepages=N)"


def hugepage_dir(host: HostConfig, memory: MemorySpec) -> str:
    """The private hugetlbfs the executor mounts for this page size (QEMU's user's, 0700)."""
    return f"{host.hugepagesDir}/{'1G' if memory.hugepageSize == '1Gi' else '2M'}"


def hugepage_refusal(memory: MemorySpec, size: int, cpu_host: ObservedCpuHost, what: str,
                     released: int = 0) -> str | None:
    """Too few free hugepages for ``size`` bytes of the VM's memory: the refusal, naming what to do.
    ``released``: pages of this size the plan frees first (a restart: the running QEMU's own)."""
    kib = memory.hugepage_bytes // 1024
    pool = cpu_host.hugepages.get(kib)
    label = f"{format_size(memory.hugepage_bytes)} hugepages"
    if not cpu_host.read:
        return f"spec.memory.hugepages: the host's hugepage pools were not observed; cannot back {what}"
    if pool is None or pool.total == 0:
        return (f"spec.memory.hugepages: the host has no {label} configured "
                f"(/sys/kernel/mm/hugepages/hugepages-{kib}kB); {HUGEPAGE_HELP}")
    need, free = size // memory.hugepage_bytes, pool.free - pool.reserved + released
    if need > free:
        return (f"spec.memory.hugepages: {what} ({format_size(size)}) needs {need} free {label}, the host has "
                f"{free} free of {pool.total}; {HUGEPAGE_HELP} or set hugepages: false")
    return None


def hugepages(spec: VirtualMachineSpec, process: ObservedProcess | None, steps: list[s.Step],
              cpu_host: ObservedCpuHost, host: HostConfig) -> tuple[list[s.Step], list[str]]:
    """A VM's steps with DIMMs on hugepages when its running QEMU's base memory is, and the refusals when a start
    or a DIMM needs more free hugepages than the host has."""
    launched = process.launched if process is not None else None
    held = launched.memory if launched is not None and launched.memory.hugepages else None
    live_memory = process.live.memory if process is not None and process.live is not None else 0
    refusals = []
    if any(isinstance(step, s.Start) for step in steps):
        # A restart frees the running QEMU's own hugepages (of the same size) before the new one takes them.
        released = live_memory // held.hugepage_bytes if held and held.hugepageSize == spec.memory.hugepageSize else 0
        if spec.memory.hugepages and (refusal := hugepage_refusal(spec.memory, spec.memory.size, cpu_host,
                                                                  "the guest's memory", released)):
            refusals.append(refusal)
        return steps, refusals
    out: list[s.Step] = []
    for step in steps:
        if isinstance(step, s.AddMemory) and held is not None:
            step = step.model_copy(update={"hugepages": hugepage_dir(host, held)})
            if refusal := hugepage_refusal(held, step.size, cpu_host, "a DIMM added live"):
                refusals.append(refusal)
        out.append(step)
    return out, refusals


def after_hugepages(observed: ObservedState, name: str, steps: list[s.Step], spec: VirtualMachineSpec) -> ObservedState:
    """``observed`` less the hugepages a VM's steps take (its start, DIMMs on hugepages; a restart only what it
    takes beyond what its running QEMU held), so VMs planned after it in the same plan do not count them free."""
    memory = spec.memory
    pages = 0
    if memory.hugepages and any(isinstance(step, s.Start) for step in steps):
        pages = memory.size // memory.hugepage_bytes
        process = observed.vm(name).process
        held = process.launched.memory if process is not None and process.launched is not None else None
        if held is not None and held.hugepages and held.hugepageSize == memory.hugepageSize and process is not None \
                and process.live is not None:
            pages -= process.live.memory // memory.hugepage_bytes
    pages += sum(step.size // memory.hugepage_bytes for step in steps
                 if isinstance(step, s.AddMemory) and step.hugepages is not None)
    kib = memory.hugepage_bytes // 1024
    pool = observed.cpu_host.hugepages.get(kib)
    if pages <= 0 or pool is None:
        return observed
    less = pool.model_copy(update={"free": max(0, pool.free - pages)})
    cpu_host = observed.cpu_host.model_copy(update={"hugepages": {**observed.cpu_host.hugepages, kib: less}})
    return observed.model_copy(update={"cpu_host": cpu_host})


# -- choosing CPUs ----------------------------------------------------------------------------------------


def _strategy_of(spec: VirtualMachineSpec) -> CpuPlacement | None:
    placement = spec.cpu.placement
    return placement if placement is not None and placement.cpuSet is None else None


def _order(name: str, placement: CpuPlacement, free: list[int], cpu_host: ObservedCpuHost, need: int) -> list[int]:
    """Free CPUs in the order the strategy takes them."""
    if placement.strategy == "spread":
        # Round-robin over the NUMA nodes, each node's free CPUs in an order seeded by the VM's name and seed:
        # spread out across nodes, and two VMs with different names or seeds start from different CPUs.
        def key(what: str) -> bytes:
            return hashlib.sha256(f"{placement.seed}:{name}:{what}".encode()).digest()

        nodes = sorted(cpu_host.nodes.items(), key=lambda item: key(f"node{item[0]}"))
        queues = [sorted((cpu for cpu in cpus if cpu in free), key=lambda cpu: key(str(cpu))) for _, cpus in nodes]
        spread = [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]
        return spread + sorted(set(free) - set(spread), key=lambda cpu: key(str(cpu)))
    # basic: NUMA-local when one node has enough free CPUs (the first such node), else node after node.
    by_node = [[cpu for cpu in cpus if cpu in free] for _, cpus in sorted(cpu_host.nodes.items())]
    local = next((cpus for cpus in by_node if len(cpus) >= need), None)
    ordered = local if local is not None else [cpu for cpus in by_node for cpu in cpus]
    return ordered + sorted(set(free) - set(ordered))


def _kept(spec: VirtualMachineSpec, record: AppliedRecord | None, online: set[int]) -> list[int]:
    """The recorded choice, while it is valid: same strategy, seed and sharing, every CPU still online."""
    if record is None or not record.placement_cpus:
        return []
    before = record.vm.spec.cpu.placement
    now = spec.cpu.placement
    same = before is not None and now is not None and (before.strategy, before.seed, before.shareCpus) == (
        now.strategy, now.seed, now.shareCpus) and before.cpuSet is None
    return list(record.placement_cpus) if same and set(record.placement_cpus) <= online else []


def _explicit(desired: Mapping[str, VirtualMachine]) -> dict[int, str]:
    """Host CPU -> the first VM (by name) whose cpuSet names it."""
    taken: dict[int, str] = {}
    for name in sorted(desired):
        cpus = desired[name].spec.cpu.placement
        if cpus is not None and cpus.cpus is not None:
            taken.update({cpu: name for cpu in sorted(cpus.cpus) if cpu not in taken})
    return taken


def _choose(name: str, spec: VirtualMachineSpec, kept: list[int], taken: dict[int, str],
            cpu_host: ObservedCpuHost) -> list[int] | str:
    """One VM's CPUs: what it keeps of its recorded choice, then free CPUs in the strategy's order."""
    placement = _strategy_of(spec)
    assert placement is not None
    need = spec.cpu.count
    mine = [cpu for cpu in kept if placement.shareCpus or taken.get(cpu, name) == name][:need]
    free = sorted(cpu for cpu in cpu_host.online if cpu not in mine and (placement.shareCpus or cpu not in taken))
    if len(mine) + len(free) < need:
        held = ", ".join(f"{cpu} by {owner}" for cpu, owner in sorted(taken.items()) if owner != name)
        return (f"spec.cpu.placement: strategy {placement.strategy} needs {need} host CPU(s) no other pinned VM "
                f"uses; {len(mine) + len(free)} free of online {format_cpu_list(cpu_host.online)} "
                f"(taken: {held or 'none'}); set shareCpus: true to share, or give a cpuSet")
    return mine + _order(name, placement, free, cpu_host, need - len(mine))[: need - len(mine)]


def choose_all(desired: Mapping[str, VirtualMachine], records: Mapping[str, AppliedRecord],
               cpu_host: ObservedCpuHost) -> dict[str, list[int] | str]:
    """For every desired VM placed by a strategy: its CPUs (one per vCPU, in vCPU order) or why none fit."""
    online = set(cpu_host.online)
    taken = _explicit(desired)
    strategic = [name for name in sorted(desired) if _strategy_of(desired[name].spec) is not None]
    kept = {name: _kept(desired[name].spec, records.get(name), online) for name in strategic}
    choices: dict[str, list[int] | str] = {}
    for name in sorted(strategic, key=lambda n: (not kept[n], n)):
        choices[name] = choice = _choose(name, desired[name].spec, kept[name], taken, cpu_host)
        if isinstance(choice, list):
            taken.update({cpu: name for cpu in choice if cpu not in taken})
    return choices


# -- the target and drift ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where each vCPU thread and the other threads may run, and the cgroup's cpuset (None: no cgroup)."""

    vcpus: dict[int, frozenset[int]]
    emulator: frozenset[int]
    cgroup_cpus: frozenset[int] | None
    cgroup_mems: frozenset[int]

    def step_args(self) -> dict[str, object]:
        return {"vcpus": {i: format_cpu_list(c) for i, c in sorted(self.vcpus.items())},
                "emulator": format_cpu_list(self.emulator),
                "cgroup_cpus": format_cpu_list(self.cgroup_cpus) if self.cgroup_cpus is not None else None,
                "cgroup_mems": format_cpu_list(self.cgroup_mems)}


def _mems(cpus: frozenset[int], cpu_host: ObservedCpuHost) -> frozenset[int]:
    """The NUMA nodes with memory whose CPUs the VM uses (memory local to its CPUs); all of them if none."""
    local = {node for node, node_cpus in cpu_host.nodes.items() if cpus & set(node_cpus)}
    mems = frozenset(local & set(cpu_host.memory_nodes))
    return mems or frozenset(cpu_host.memory_nodes)


def target(spec: VirtualMachineSpec, chosen: list[int] | None, cpu_host: ObservedCpuHost, host: HostConfig,
           vcpus: int) -> Target:
    """The placement to apply for ``vcpus`` vCPUs; an unpinned VM gets every CPU online (unpinning)."""
    placement = spec.cpu.placement
    online = frozenset(cpu_host.online)
    use_cgroup = host.cpusetCgroup == "required" and cpu_host.cpuset.version is not None
    if placement is None:
        return Target(vcpus=dict.fromkeys(range(vcpus), online), emulator=online,
                      cgroup_cpus=online if use_cgroup else None, cgroup_mems=frozenset(cpu_host.memory_nodes))
    if placement.cpus is not None:
        pool = placement.cpus
        per_vcpu = {i: frozenset({placement.vcpuPins[i]}) if i in placement.vcpuPins else pool for i in range(vcpus)}
    else:
        chosen = chosen or []
        pool = frozenset(chosen)
        per_vcpu = {i: frozenset({chosen[i]}) if i < len(chosen) else pool for i in range(vcpus)}
    emulator_cpus = parse_cpu_list(placement.emulatorCpuSet) if placement.emulatorCpuSet else pool
    union = pool | emulator_cpus
    return Target(vcpus=per_vcpu, emulator=emulator_cpus, cgroup_cpus=union if use_cgroup else None,
                  cgroup_mems=_mems(union, cpu_host))


def drift(want: Target, seen: ObservedPlacement, vcpu_threads: Mapping[int, int]) -> list[str]:
    """How the running QEMU differs from ``want`` (empty: in place). vCPUs that share a thread (TCG without
    MTTCG) share the union of their CPUs."""
    per_thread: dict[int, set[int]] = {}
    for index, tid in vcpu_threads.items():
        per_thread.setdefault(tid, set()).update(want.vcpus.get(index, want.emulator))
    found = []
    for index, tid in sorted(vcpu_threads.items()):
        expected = format_cpu_list(per_thread[tid])
        if (have := seen.vcpus.get(index)) is not None and have != expected:
            found.append(f"vCPU {index} (thread {tid}) may run on {have}, not {expected}")
    wrong = [cpus for cpus in seen.emulator if cpus != format_cpu_list(want.emulator)]
    if wrong:
        found.append(f"emulator threads may run on {', '.join(wrong)}, not {format_cpu_list(want.emulator)}")
    if want.cgroup_cpus is not None:
        found += _cgroup_drift(want, seen)
    return found


def _cgroup_drift(want: Target, seen: ObservedPlacement) -> list[str]:
    assert want.cgroup_cpus is not None
    if seen.cgroup is None:
        return ["its cpuset cgroup is missing"]
    found = []
    if seen.cgroup_cpus != format_cpu_list(want.cgroup_cpus) or seen.cgroup_mems != format_cpu_list(want.cgroup_mems):
        found.append(f"its cgroup's cpuset is cpus {seen.cgroup_cpus or 'none'} mems {seen.cgroup_mems or 'none'}, "
                     f"not cpus {format_cpu_list(want.cgroup_cpus)} mems {format_cpu_list(want.cgroup_mems)}")
    if not seen.in_cgroup:
        found.append(f"QEMU is not in its cgroup {seen.cgroup}")
    return found


# -- one VM -------------------------------------------------------------------------------------------------


@dataclass
class VMPlacement:
    """What ``plan_vm`` decided for one VM."""

    refusals: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    steps: list[s.Step] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)  # the strategy's CPUs, to record
    fields: list[FieldChange] = field(default_factory=list)


def _shown(placement: CpuPlacement | None) -> str | None:
    return placement.model_dump_json(exclude_defaults=True) if placement is not None else None


def refusals(spec: VirtualMachineSpec, chosen: list[int] | str | None, cpu_host: ObservedCpuHost,
             host: HostConfig) -> list[str]:
    """Host prerequisites a pinned VM lacks, and CPUs it names that are not online."""
    placement = spec.cpu.placement
    if placement is None:
        return []
    if not cpu_host.read:
        return ["spec.cpu.placement: the host's CPUs were not observed (an offline recording without them)"]
    found = [chosen] if isinstance(chosen, str) else []
    online = set(cpu_host.online)
    for label, cpus in (("cpuSet", placement.cpuSet), ("emulatorCpuSet", placement.emulatorCpuSet)):
        if cpus is not None and (missing := parse_cpu_list(cpus) - online):
            found.append(f"spec.cpu.placement.{label}: host CPU(s) {format_cpu_list(missing)} are not online "
                         f"(online: {format_cpu_list(online)})")
    if host.cpusetCgroup == "required" and cpu_host.cpuset.version is None:
        found.append(f"spec.cpu.placement: {cpu_host.cpuset.detail}; enable the cpuset controller, or set "
                     "cpusetCgroup: off in the host policy to pin threads without a cgroup")
    return found


def _summary(want: Target, chosen: list[int], why: str) -> str:
    vcpus = ", ".join(f"vCPU {i} -> {format_cpu_list(c)}" for i, c in sorted(want.vcpus.items()))
    where = f"; cgroup cpuset.cpus {format_cpu_list(want.cgroup_cpus)} mems {format_cpu_list(want.cgroup_mems)}" \
        if want.cgroup_cpus is not None else "; no cpuset cgroup"
    picked = f" (chosen by the strategy: {format_cpu_list(chosen)})" if chosen else ""
    return f"pin threads{picked}: {vcpus}; emulator -> {format_cpu_list(want.emulator)}{where} ({why})"


def plan_vm(name: str, spec: VirtualMachineSpec, record: AppliedRecord | None, chosen: list[int] | str | None,
            cpu_host: ObservedCpuHost, host: HostConfig, running: tuple[ObservedPlacement, Mapping[int, int]] | None,
            starting: bool, launched: VirtualMachineSpec | None, cpus_added: bool) -> VMPlacement:
    """The placement part of one VM's change: after a start, or on the running QEMU when it drifted, its
    placement changed or vCPUs were added (a new vCPU thread inherits the emulator threads' CPUs)."""
    work = VMPlacement(refusals=refusals(spec, chosen, cpu_host, host))
    if work.refusals:
        return work
    picked = chosen if isinstance(chosen, list) else []
    work.chosen = picked
    was_pinned = (launched is not None and launched.cpu.placement is not None) or (
        record is not None and record.vm.spec.cpu.placement is not None)
    if spec.cpu.placement is None and not was_pinned:
        return work
    want = target(spec, picked, cpu_host, host, spec.cpu.count)
    if starting:
        if spec.cpu.placement is not None:
            work.steps.append(s.SetPlacement(name=name, summary=_summary(want, picked, "after the start"),
                                             chosen=picked, **want.step_args()))  # type: ignore[arg-type]
        return work
    if running is not None:
        _running(work, name, spec, record, want, running, cpus_added)
    return work


def _running(work: VMPlacement, name: str, spec: VirtualMachineSpec, record: AppliedRecord | None, want: Target,
             running: tuple[ObservedPlacement, Mapping[int, int]], cpus_added: bool) -> None:
    """On the running QEMU: re-pin when it drifted, when the placement changed or vCPUs were added, or when the
    strategy's choice is not recorded yet."""
    seen, threads = running
    before = record.vm.spec.cpu.placement if record is not None else None
    if record is not None and before != spec.cpu.placement:
        work.fields.append(FieldChange(path="cpu.placement", before=_shown(before), after=_shown(spec.cpu.placement),
                                       mode=Mode.LIVE, how=rule_for(("cpu", "placement")).how))
    found = drift(want, seen, threads)
    unrecorded = work.chosen != (record.placement_cpus if record is not None else [])
    if found or cpus_added or unrecorded:
        why = "unpin" if spec.cpu.placement is None else "placement changed" if work.fields else "drift" if found \
            else ("new vCPUs" if cpus_added else "record the strategy's choice")
        work.reasons += [f"placement: {line}" for line in found]
        work.steps.append(s.SetPlacement(name=name, summary=_summary(want, work.chosen, why),
                                         chosen=work.chosen, **want.step_args()))  # type: ignore[arg-type]
