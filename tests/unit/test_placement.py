"""CPU placement and hugepages, the pure parts: CPU lists, the manifest's rules, the argv, strategies, drift."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from reconciler.adapters import cgroups
from reconciler.apply import placement as apply_placement
from reconciler.plan import placement
from reconciler.plan.hostfacts import CpusetHierarchy, HugepagePool, ObservedCpuHost, ObservedPlacement
from reconciler.qemu.argv import OpenedFiles, UnsafeOptionValue, build_argv
from reconciler.spec.host import HostConfig
from reconciler.spec.loader import load_text
from reconciler.spec.models import VirtualMachine
from reconciler.spec.placement import format_cpu_list, parse_cpu_list
from reconciler.state.layout import StateLayout
from reconciler.state.models import AppliedRecord

HEAD = "apiVersion: infinization.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: %s}\nspec:\n"
HOST = ObservedCpuHost(read=True, online=list(range(8)), nodes={0: [0, 1, 2, 3], 1: [4, 5, 6, 7]},
                       memory_nodes=[0, 1], hugepages={2048: HugepagePool(total=100, free=60, reserved=10)},
                       cpuset=CpusetHierarchy(version="v2", mount="/sys/fs/cgroup"))


def vm(body: str, name: str = "web") -> VirtualMachine:
    objects, errors = load_text(HEAD % name + body, "f.yaml")
    assert not errors, errors
    found = objects[0][0]
    assert isinstance(found, VirtualMachine)
    return found


def errors(body: str) -> list[str]:
    return [str(error) for error in load_text(HEAD % "web" + body, "f.yaml")[1]]


@pytest.mark.parametrize(("text", "cpus", "canonical"), [
    ("0-3,6", {0, 1, 2, 3, 6}, "0-3,6"), ("6, 0-1 ,3", {0, 1, 3, 6}, "0-1,3,6"), ("5", {5}, "5"),
    ("1-1", {1}, "1"), ("", set(), ""),
])
def test_cpu_lists_parse_and_print_canonically(text: str, cpus: set[int], canonical: str) -> None:
    assert parse_cpu_list(text) == cpus
    assert format_cpu_list(parse_cpu_list(text)) == canonical


@pytest.mark.parametrize("text", ["3-1", "a", "1,,2", "0-", "-1", "1-99999", "0x1"])
def test_bad_cpu_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="CPU"):
        parse_cpu_list(text)


def test_manifest_placement_is_canonical_and_pins_take_integer_keys() -> None:
    one = vm('  cpu: {cores: 2, placement: {cpuSet: "5,4", vcpuPins: {0: 4, 1: 5}, emulatorCpuSet: 0}}\n')
    two = vm('  cpu: {cores: 2, placement: {cpuSet: "4-5", vcpuPins: {"0": 4, "1": 5}, emulatorCpuSet: "0"}}\n')
    assert one == two
    assert one.spec.cpu.placement is not None and one.spec.cpu.placement.cpuSet == "4-5"


@pytest.mark.parametrize(("cpu", "message"), [
    ('{cores: 2, placement: {cpuSet: "4-5", vcpuPins: {0: 6}}}', "vcpuPins: host CPU(s) 6 are not in cpuSet 4-5"),
    ("{cores: 2, placement: {vcpuPins: {0: 1}}}", "vcpuPins needs cpuSet"),
    ('{cores: 2, placement: {cpuSet: "0-3", vcpuPins: {2: 1}}}', "vCPU 2 does not exist"),
    ('{cores: 1, placement: {cpuSet: "3-1"}}', "backwards"),
    ('{cores: 1, placement: {cpuSet: "0,1=2"}}', "expected a CPU list"),
    ("{cores: 1, placement: {strategy: random}}", "strategy"),
    ("{cores: 1, placement: {cpuset: 1}}", "unknown field 'cpuset'"),
])
def test_bad_placements_are_located_errors(cpu: str, message: str) -> None:
    found = errors(f"  cpu: {cpu}\n")
    assert found and found[0].startswith("f.yaml:5:") and message in found[0], found


def test_hugepage_memory_must_be_whole_pages() -> None:
    assert "multiple of hugepageSize (1Gi)" in errors("  memory: {size: 1536Mi, hugepages: true, "
                                                      "hugepageSize: 1Gi}\n")[0]
    assert "hugepageSize" in errors("  memory: {size: 1Gi, hugepages: true, hugepageSize: 4Mi}\n")[0]


def test_hugepages_argv_backs_the_base_memory_with_a_preallocated_file_backend() -> None:
    spec = vm("  memory: {size: 512Mi, maxSize: 1Gi, hugepages: true}\n  boot: {kernel: /srv/k}\n").spec
    paths = StateLayout(Path("/var/lib/infz")).vm("web")
    argv = build_argv("web", spec, paths, files=OpenedFiles(hugepages="/run/infinization/hugepages/2M"))
    assert argv[argv.index("-machine") + 1] == "q35,memory-backend=mem-base"
    assert argv[argv.index("-m") + 1] == "size=512M,slots=8,maxmem=1024M"
    objects = [json.loads(argv[i + 1]) for i, arg in enumerate(argv) if arg == "-object" and argv[i + 1][0] == "{"]
    assert {"qom-type": "memory-backend-file", "id": "mem-base", "size": 512 * 1024**2,
            "mem-path": "/run/infinization/hugepages/2M", "prealloc": True, "share": False} in objects
    with pytest.raises(UnsafeOptionValue, match="hugetlbfs"):
        build_argv("web", spec, paths)
    with pytest.raises(UnsafeOptionValue):
        build_argv("web", spec, paths, files=OpenedFiles(hugepages="/run/x,share=on"))
    plain = build_argv("web", vm("  boot: {kernel: /srv/k}\n").spec, paths)
    assert "memory-backend" not in " ".join(plain)


def test_hugepage_refusals_count_reserved_pages_and_name_the_fix() -> None:
    memory = vm("  memory: {size: 128Mi, hugepages: true}\n").spec.memory
    assert placement.hugepage_refusal(memory, 100 * 1024**2, HOST, "x") is None  # 50 pages of 60 - 10 free
    refusal = placement.hugepage_refusal(memory, 128 * 1024**2, HOST, "the guest's memory")
    assert refusal is not None and "needs 64 free 2Mi hugepages, the host has 50 free of 100" in refusal
    assert "nr_hugepages" in refusal
    big = vm("  memory: {size: 1Gi, hugepages: true, hugepageSize: 1Gi}\n").spec.memory
    assert "no 1Gi hugepages configured" in str(placement.hugepage_refusal(big, 1024**3, HOST, "x"))


def test_strategies_are_deterministic_numa_local_and_never_share() -> None:
    desired = {
        "a": vm('  cpu: {cores: 2, placement: {cpuSet: "0-1"}}\n', "a"),
        "b": vm("  cpu: {cores: 2, placement: {strategy: basic}}\n", "b"),
        "c": vm("  cpu: {cores: 3, placement: {strategy: basic}}\n", "c"),
        "d": vm("  cpu: {cores: 2, placement: {strategy: spread, seed: 1}}\n", "d"),
    }
    chosen = placement.choose_all(desired, {}, HOST)
    assert chosen["b"] == [2, 3], "node 0 still has two free CPUs: NUMA-local"
    assert chosen["c"] == [4, 5, 6], "node 1 is the first node with three free"
    assert isinstance(chosen["d"], str) and "needs 2 host CPU(s)" in chosen["d"] and "0 by a" in chosen["d"]
    assert placement.choose_all(desired, {}, HOST) == chosen


def test_a_recorded_choice_is_kept_and_wins_over_new_ones() -> None:
    desired = {"a": vm("  cpu: {cores: 2, placement: {strategy: basic}}\n", "a"),
               "z": vm("  cpu: {cores: 2, placement: {strategy: basic}}\n", "z")}
    records = {"z": AppliedRecord(vm=desired["z"], placement_cpus=[0, 1])}
    chosen = placement.choose_all(desired, records, HOST)
    assert chosen == {"z": [0, 1], "a": [2, 3]}
    other_seed = {"z": vm("  cpu: {cores: 2, placement: {strategy: spread, seed: 9}}\n", "z"), "a": desired["a"]}
    again = placement.choose_all(other_seed, records, HOST)
    assert again["a"] == [0, 1], "z's old choice is no longer held: another strategy chooses again"
    assert isinstance(again["z"], list) and len(again["z"]) == 2 and not set(again["z"]) & {0, 1}


def test_drift_sees_moved_threads_missing_cgroups_and_shared_vcpu_threads() -> None:
    spec = vm('  cpu: {cores: 2, placement: {cpuSet: "2-3", vcpuPins: {0: 2, 1: 3}, emulatorCpuSet: "0"}}\n').spec
    want = placement.target(spec, None, HOST, HostConfig(), 2)
    assert want.cgroup_cpus == {0, 2, 3} and want.cgroup_mems == {0}
    good = ObservedPlacement(vcpus={0: "2", 1: "3"}, emulator=["0"], cgroup="/g", cgroup_cpus="0,2-3",
                             cgroup_mems="0", in_cgroup=True)
    assert placement.drift(want, good, {0: 10, 1: 11}) == []
    moved = good.model_copy(update={"vcpus": {0: "0-7", 1: "3"}, "in_cgroup": False})
    assert placement.drift(want, moved, {0: 10, 1: 11}) == [
        "vCPU 0 (thread 10) may run on 0-7, not 2", "QEMU is not in its cgroup /g"]
    # One thread for both vCPUs (TCG without MTTCG): that thread may use both CPUs.
    shared = good.model_copy(update={"vcpus": {0: "2-3", 1: "2-3"}})
    assert placement.drift(want, shared, {0: 10, 1: 10}) == []
    off = placement.target(spec, None, HOST, HostConfig(cpusetCgroup="off"), 2)
    assert off.cgroup_cpus is None and placement.drift(off, good.model_copy(update={"cgroup": None}),
                                                       {0: 10, 1: 11}) == []


def test_missing_prerequisites_are_refusals_not_downgrades() -> None:
    spec = vm('  cpu: {cores: 1, placement: {cpuSet: "9"}}\n').spec
    bare = HOST.model_copy(update={"cpuset": CpusetHierarchy(detail="no cpuset cgroup controller (test)")})
    found = placement.refusals(spec, None, bare, HostConfig())
    assert any("cpuSet: host CPU(s) 9 are not online" in line for line in found)
    assert any("no cpuset cgroup controller (test)" in line and "cpusetCgroup: off" in line for line in found)
    assert not any("cgroup" in line for line in placement.refusals(spec, None, bare, HostConfig(cpusetCgroup="off")))
    assert placement.refusals(spec, None, ObservedCpuHost(), HostConfig())[0].endswith("were not observed "
                                                                                       "(an offline recording "
                                                                                       "without them)")


def _fake_hierarchy(root: Path, version: str) -> CpusetHierarchy:
    """A cgroup mount as plain files: what the kernel would refuse is not checked, only what we write and where."""
    root.mkdir()
    for name, value in (("cpuset.cpus", "0-7"), ("cpuset.mems", "0-1"), ("cgroup.subtree_control", "")):
        (root / name).write_text(value)
    slice_dir = root / "infinization.slice"
    slice_dir.mkdir()
    for name in ("cpuset.cpus", "cpuset.mems", "cgroup.subtree_control"):
        (slice_dir / name).write_text("")
    return CpusetHierarchy(version=version, mount=str(root))  # type: ignore[arg-type]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_vm_cgroup_gets_its_cpuset_before_qemu_joins(tmp_path: Path, version: str) -> None:
    hierarchy = _fake_hierarchy(tmp_path / "cg", version)
    paths = StateLayout(tmp_path / "st").vm("web")
    group = apply_placement._join(hierarchy, paths, 4242, "2-3", "0")
    assert group == tmp_path / "cg" / "infinization.slice" / cgroups.scope_name(paths.dir)
    assert [(group / name).read_text() for name in ("cpuset.cpus", "cpuset.mems", "cgroup.procs")] == [
        "2-3\n", "0\n", "4242\n"]
    slice_dir = tmp_path / "cg" / "infinization.slice"
    if version == "v2":  # the controller is enabled down to the slice, whose children hold it
        assert (tmp_path / "cg" / "cgroup.subtree_control").read_text() == "+cpuset\n"
        assert (slice_dir / "cgroup.subtree_control").read_text() == "+cpuset\n"
    else:  # a v1 child starts with an empty cpuset: the slice gets its parent's before any VM joins
        assert (slice_dir / "cpuset.cpus").read_text() == "0-7\n" and (slice_dir / "cpuset.mems").read_text() == "0-1\n"
        assert (group / "cpuset.memory_migrate").read_text() == "1\n"


def test_spread_goes_across_numa_nodes_and_depends_on_name_and_seed() -> None:
    def chosen(name: str, seed: int) -> list[int]:
        spec = vm(f"  cpu: {{cores: 2, placement: {{strategy: spread, seed: {seed}}}}}\n", name)
        result = placement.choose_all({name: spec}, {}, HOST)[name]
        assert isinstance(result, list)
        return result

    for name, seed in (("a", 0), ("b", 0), ("a", 5)):
        picked = chosen(name, seed)
        assert {cpu // 4 for cpu in picked} == {0, 1}, "one CPU on each node"
        assert chosen(name, seed) == picked
    assert len({tuple(chosen(n, s)) for n, s in (("a", 0), ("b", 0), ("a", 5), ("c", 1), ("d", 2))}) > 1


def test_qemu_starts_on_its_cpus_when_they_are_known_before_it_runs() -> None:
    ours = os.sched_getaffinity(0)
    explicit = vm(f'  cpu: {{cores: 1, placement: {{cpuSet: "{min(ours)}", emulatorCpuSet: "{max(ours)}"}}}}\n').spec
    assert apply_placement.launch_cpus(explicit, None) == format_cpu_list({min(ours), max(ours)})
    strategy = vm("  cpu: {cores: 1, placement: {strategy: basic}}\n")
    assert apply_placement.launch_cpus(strategy.spec, None) is None, "a first start: set-placement pins it"
    recorded = AppliedRecord(vm=strategy, placement_cpus=[max(ours)])
    assert apply_placement.launch_cpus(strategy.spec, recorded) == str(max(ours))
    assert apply_placement.launch_cpus(vm("  cpu: {cores: 1}\n").spec, recorded) is None
    offline = vm('  cpu: {cores: 1, placement: {cpuSet: "4000"}}\n').spec
    assert apply_placement.launch_cpus(offline, None) is None, "never a CPU we cannot use ourselves"
