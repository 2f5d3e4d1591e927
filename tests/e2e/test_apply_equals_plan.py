"""Property test on real QEMU (hypothesis): `apply` does exactly the steps the plan showed, and the plan
right after is empty; an invalid edit changes nothing.

Each example is a fresh host (its own state and manifest directories) with 1-3 generated VMs (disks, NICs on
user networking or none, memory, vCPUs, runStrategy), then a sequence of generated states, each one or two
edits away from the last: a disk added, grown or removed, a NIC added or removed, memory or vCPUs changed
(live, or needing a restart: fewer vCPUs), runStrategy changed, a VM added or its manifest deleted; and
invalid edits (injection characters, huge numbers, odd unicode, deep nesting, unknown fields). For every
valid state:

- ``plan --json`` is computed, then ``apply --yes --json`` (the document of every step it ran,
  docs/plan-format.md): the steps it executed are the plan's (same kinds, targets and arguments, same VMs,
  same order within a VM), all ok, and the plan inside apply's document is the one ``plan --json`` showed;
- when the plan has restarts pending, apply without ``--allow-restart`` ran only the live part (the same
  QEMU still runs) and the plan is not empty; then ``plan --allow-restart`` and ``apply --allow-restart``
  must match the same way;
- ``plan --detailed-exitcode`` exits 0 afterwards, and each running guest reports (serial console) the disks
  sizes, NIC MACs and vCPUs its manifest says, and memory within the kernel's reserve of it (120 MiB); a VM halted or
  deleted has no QEMU, and a deleted VM keeps its disks.

For an invalid edit: ``validate``, ``plan --json`` and ``apply --json`` exit 1 with a ``file:line:col`` error
in that file, and the host is unchanged (same QEMU pids, same files in the state directory, same disk sizes);
putting the last valid text back leaves nothing to do. At the end of an example, the status store's events
list the same steps per VM as apply's documents did.

Examples: ``INFZ_E2E_PROPERTY_EXAMPLES`` (default 2: 6 to 10 minutes measured on 2 cores at a load average of
70-95, TCG boots taking ~90 s there; most of it is guests booting), seed
``INFZ_E2E_PROPERTY_SEED`` (default 0: CI runs the same examples every time), states per example
``INFZ_E2E_PROPERTY_STATES`` (default 3). A nightly-style run:
``INFZ_E2E_PROPERTY_EXAMPLES=200 INFZ_E2E_PROPERTY_STATES=8 INFZ_E2E_PROPERTY_SEED=$RANDOM``; shrinking a
failure re-runs real VMs many times, so it is off unless ``INFZ_E2E_PROPERTY_SHRINK=1``. Each state is printed
as it runs, so a failure's log says which edits led to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.e2e.harness import GUEST_DIR, Host, Report

MiB = 1024**2
EXAMPLES = int(os.environ.get("INFZ_E2E_PROPERTY_EXAMPLES", "2"))
STATES = int(os.environ.get("INFZ_E2E_PROPERTY_STATES", "3"))
SEED = int(os.environ.get("INFZ_E2E_PROPERTY_SEED", "0"))
PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + (
    [Phase.shrink] if os.environ.get("INFZ_E2E_PROPERTY_SHRINK") == "1" else [])
MEMORY = (256, 384, 512)  # MiB, multiples of Linux's 128 MiB hot-plug block (the guest OOMs in 128Mi); maxSize 640Mi
# pytest-timeout's 600 s fits the default run; a longer one gets ~4 minutes per state on a loaded machine.
TIMEOUT = max(600, 300 + EXAMPLES * (STATES + 1) * 240)
RESERVE = 120  # MiB the guest's kernel and initramfs keep out of MemTotal (~100 measured), < 128
MAX_DISKS, MAX_NICS = 3, 2  # with hotplugSlots 4: every live add has a free slot
RUN = ("Always", "RerunOnFailure", "Halted")


# -- the model: what the manifests say --------------------------------------------------------------


@dataclass
class VM:
    name: str
    index: int
    disks: dict[str, int]  # name -> MiB, in manifest order
    nics: dict[str, str]  # name -> MAC
    memory: int  # MiB
    cores: int
    run: str

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "infinization.io/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": self.name},
            "spec": {
                "runStrategy": self.run, "machine": {"type": "q35", "accel": "tcg"},
                "cpu": {"cores": self.cores, "maxCpus": 2},
                "memory": {"size": f"{self.memory}Mi", "maxSize": "640Mi", "balloon": True},
                "hotplugSlots": 4, "terminationGracePeriodSeconds": 15,
                "boot": {"kernel": f"{GUEST_DIR}/vmlinuz", "initrd": f"{GUEST_DIR}/initrd.img",
                         "cmdline": "console=ttyS0 panic=-1"},
                "disks": [{"name": n, "size": f"{s}Mi"} for n, s in self.disks.items()],
                "networks": [{"name": n, "type": "user", "mac": mac} for n, mac in self.nics.items()],
            },
        }

    @property
    def running(self) -> bool:
        return self.run != "Halted"


@dataclass
class World:
    vms: dict[str, VM] = field(default_factory=dict)
    counter: int = 0  # names are never reused: a removed disk's file stays, and must not be shrunk by a reuse
    deleted: list[str] = field(default_factory=list)

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def new_vm(self, data: st.DataObject) -> VM:
        index = self.counter + 1
        vm = VM(self.fresh("p"), index, {"root": data.draw(st.sampled_from([16, 32, 64]), label="root MiB")},
                {}, data.draw(st.sampled_from(MEMORY), label="memory"),
                data.draw(st.sampled_from([2, 1]), label="cores"), data.draw(st.sampled_from(RUN), label="runStrategy"))
        for _ in range(data.draw(st.integers(0, MAX_DISKS - 1), label="extra disks")):
            vm.disks[self.fresh("d")] = data.draw(st.sampled_from([16, 32]))
        for _ in range(data.draw(st.integers(0, MAX_NICS), label="nics")):
            self.add_nic(vm)
        self.vms[vm.name] = vm
        return vm

    def add_nic(self, vm: VM) -> None:
        name = self.fresh("n")
        vm.nics[name] = f"52:54:00:ee:{vm.index % 256:02x}:{self.counter % 256:02x}"


def edit(world: World, data: st.DataObject, state: int) -> str:
    """One valid edit of the world, drawn; returns what it did (for the log). The kinds are rotated by the
    state's index, so that hypothesis' first (simplest) example is not the same edit every time: it restarts
    (2 vCPUs to 1), hot-plugs a DIMM, then a disk."""
    vm = world.vms[data.draw(st.sampled_from(sorted(world.vms)), label="vm")]
    possible = {"cores": True, "memory": True, "add-disk": len(vm.disks) < MAX_DISKS, "grow-disk": True,
                "run": True, "add-nic": len(vm.nics) < MAX_NICS, "remove-disk": len(vm.disks) > 1,
                "remove-nic": bool(vm.nics), "add-vm": len(world.vms) < 3, "delete-vm": len(world.vms) > 1}
    kinds = [kind for kind, ok in possible.items() if ok]
    kinds = kinds[state % len(kinds):] + kinds[:state % len(kinds)]
    kind = data.draw(st.sampled_from(kinds), label="edit")
    if kind == "grow-disk":
        disk = data.draw(st.sampled_from(sorted(vm.disks)))
        vm.disks[disk] += data.draw(st.sampled_from([16, 32]))
        return f"{vm.name}: grow {disk} to {vm.disks[disk]}Mi"
    if kind == "memory":
        vm.memory = data.draw(st.sampled_from([m for m in MEMORY if m != vm.memory]))
        return f"{vm.name}: memory {vm.memory}Mi"
    if kind == "cores":
        vm.cores = 3 - vm.cores
        return f"{vm.name}: {vm.cores} vCPU(s)"
    if kind == "run":
        vm.run = data.draw(st.sampled_from([r for r in RUN if r != vm.run]))
        return f"{vm.name}: runStrategy {vm.run}"
    if kind == "add-disk":
        disk = world.fresh("d")
        vm.disks[disk] = data.draw(st.sampled_from([16, 32]))
        return f"{vm.name}: add disk {disk} {vm.disks[disk]}Mi"
    if kind == "remove-disk":
        disk = data.draw(st.sampled_from(sorted(d for d in vm.disks if d != "root")))
        del vm.disks[disk]
        return f"{vm.name}: remove disk {disk}"
    if kind == "add-nic":
        world.add_nic(vm)
        return f"{vm.name}: add NIC {list(vm.nics)[-1]}"
    if kind == "remove-nic":
        nic = data.draw(st.sampled_from(sorted(vm.nics)))
        del vm.nics[nic]
        return f"{vm.name}: remove NIC {nic}"
    if kind == "add-vm":
        return f"add VM {world.new_vm(data).name}"
    del world.vms[vm.name]
    world.deleted.append(vm.name)
    return f"delete VM {vm.name}"


# -- invalid edits ----------------------------------------------------------------------------------

HUGE = st.sampled_from([2**63, 2**70, 10**30, -1, "99999999999Pi", "1e30", "512Mi,share=on", "9" * 40])
INJECT = st.sampled_from(["a,b", "x=y", "a\nb", "é", "日本", "\u202e", "$(id)", "../x", ";rm", "A", "-a", ""])


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def invalid(vm: VM, data: st.DataObject) -> tuple[str, dict[str, Any]]:
    """A manifest of ``vm`` with one generated value that must fail validation, and what it is."""
    document = vm.manifest()
    spec = document["spec"]
    where = data.draw(st.sampled_from(["memory", "cores", "disk-size", "disk-name", "nic-mac", "name", "nesting",
                                       "unknown", "cmdline-type"]), label="invalid field")
    if where == "memory":
        spec["memory"]["size"] = data.draw(HUGE)
    elif where == "cores":
        spec["cpu"]["cores"] = data.draw(st.sampled_from([2**63, 10**9, 0, -3, "2,maxcpus=9", "二"]))
    elif where == "disk-size":
        spec["disks"][0]["size"] = data.draw(HUGE)
    elif where == "disk-name":
        spec["disks"][0]["name"] = data.draw(INJECT)
    elif where == "nic-mac":
        spec["networks"] = [{"name": "bad", "type": "user",
                             "mac": data.draw(st.sampled_from(["52:54:00:00:00:01,x", "52:54:00:00:00:0g", "日本",
                                                               "01:00:5e:00:00:01"]))}]
    elif where == "name":
        document["metadata"]["name"] = data.draw(INJECT)
    elif where == "nesting":
        spec["cpu"] = _nested(data.draw(st.integers(33, 200), label="depth"))
    elif where == "unknown":
        spec[data.draw(st.sampled_from(["bogus", "cpu,x", "disks\u200b"]))] = 1
    else:
        spec["boot"]["cmdline"] = {"x": data.draw(INJECT)}
    return where, document


# -- the host ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_host() -> Iterator[Host]:
    """One example's host (as the ``host`` fixture makes it); everything it started is killed after."""
    base = Path(tempfile.mkdtemp(prefix="infz-", dir="/tmp"))
    host = Host(base)
    try:
        yield host
    finally:
        host.kill_all()
        deadline = time.monotonic() + 10
        while (left := host.leftover_processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"processes left behind by the example: {left}"


def write(host: Host, vm: VM) -> None:
    host.write(f"{vm.name}.yaml", yaml.safe_dump(vm.manifest(), sort_keys=False))


def _json(done: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    try:
        loaded: dict[str, Any] = json.loads(done.stdout)
    except ValueError as exc:
        raise AssertionError(f"{what}: no JSON document (exit {done.returncode})\n{done.stdout}\n"
                             f"{done.stderr}") from exc
    return loaded


def planned_steps(document: dict[str, Any]) -> dict[str, list[tuple[str, str, str]]]:
    """Each resource's steps, in order: (kind, target, arguments)."""
    return {c["name"]: [(s["kind"], s["target"], json.dumps(s["args"], sort_keys=True)) for s in c["steps"]]
            for c in document["changes"] if c["steps"]}


def executed_steps(document: dict[str, Any]) -> dict[str, list[tuple[str, str, str]]]:
    found: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for s in document["executed"]:
        found[s["name"]].append((s["kind"], s["target"], json.dumps(s["args"], sort_keys=True)))
    return dict(found)


def plan_then_apply(host: Host, allow_restart: bool, log: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``plan --json`` then ``apply --yes --json``: apply ran exactly the plan's steps, all ok."""
    flags = ["--allow-restart"] if allow_restart else []
    planned = host.cli("plan", str(host.manifests), "--json", *flags)
    plan = _json(planned, "plan --json")
    assert planned.returncode == 0, f"a valid state's plan failed or was refused: {planned.stderr}\n{plan}"
    done = host.cli("apply", str(host.manifests), "--yes", "--json", *flags)
    applied = _json(done, "apply --json")
    context = f"{' / '.join(log)}\nplan: {planned_steps(plan)}\napply stderr:\n{done.stderr}"
    assert executed_steps(applied) == planned_steps(plan), f"apply ran other steps than the plan showed\n{context}"
    assert planned_steps(applied["plan"]) == planned_steps(plan), f"apply planned differently\n{context}"
    assert [s for s in applied["executed"] if s["result"] != "ok"] == [], context
    assert applied["ok"] and done.returncode == 0, f"apply failed: {applied['failed']}\n{context}"
    return plan, applied


def snapshot(host: Host, world: World) -> dict[str, Any]:
    """What an invalid edit must not change: QEMU pids, the state directory's files, disk sizes."""
    ignored = re.compile(r"(serial\.log|qemu\.log|infinization\.db.*|lock|\.tmp.*)$")
    names = {p.relative_to(host.state).as_posix() for p in host.state.rglob("*")
             if not ignored.search(p.name) and not p.is_socket()}
    sizes = {p.as_posix(): p.stat().st_size for p in (host.state / "disks").rglob("*.qcow2")}
    return {"pids": {vm: host.qemu_pids(vm) for vm in [*world.vms, *world.deleted]}, "files": names, "sizes": sizes}


def check_invalid(host: Host, world: World, data: st.DataObject, log: list[str]) -> None:
    vm = world.vms[data.draw(st.sampled_from(sorted(world.vms)), label="vm to break")]
    new_file = data.draw(st.booleans(), label="in a new file")
    where, document = invalid(vm, data)
    log.append(f"invalid {where} in {'a new file' if new_file else vm.name + '.yaml'}")
    print(f"  state: {log[-1]}")
    before = snapshot(host, world)
    filename = "zz-broken.yaml" if new_file else f"{vm.name}.yaml"
    if new_file:
        document["metadata"]["name"] = document["metadata"]["name"] if where == "name" else world.fresh("x")
    path = host.write(filename, yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    located = re.compile(re.escape(str(path)) + r":\d+:\d+")
    validated = host.cli("validate", str(host.manifests))
    assert validated.returncode == 1 and located.search(validated.stderr), (
        f"{log[-1]}: validate did not locate the error\n{path.read_text()}\n{validated.stdout}{validated.stderr}")
    planned = host.cli("plan", str(host.manifests), "--json")
    diagnostics = _json(planned, "plan --json")["diagnostics"]
    assert planned.returncode == 1 and diagnostics and {d["file"] for d in diagnostics} == {str(path)}
    assert all(d["line"] >= 1 and d["column"] >= 1 for d in diagnostics)
    applied = host.cli("apply", str(host.manifests), "--yes", "--json", "--allow-restart")
    assert applied.returncode == 1 and _json(applied, "apply --json")["diagnostics"]
    assert snapshot(host, world) == before, f"{log[-1]}: an invalid manifest changed the host"
    if new_file:
        path.unlink()
    else:
        write(host, vm)
    assert host.plan_exit() == 0, f"{log[-1]}: the valid text back, yet a plan is left"


def check_guests(host: Host, world: World, log: list[str]) -> None:
    """The final state of each VM, from inside its guest (and from the host for stopped and deleted ones)."""
    for name in world.deleted:
        assert host.qemu_pids(name) == [], f"deleted VM {name} still runs"
    for vm in world.vms.values():
        if not vm.running:
            assert host.qemu_pids(vm.name) == [], f"{vm.name} is {vm.run} but runs"
            continue
        assert host.running_pid(vm.name), f"{vm.name} should run"

        def matches(r: Report, vm: VM = vm) -> bool:
            sizes = sorted(r.disks.values()) == sorted(s * MiB for s in vm.disks.values())
            macs = {mac for mac, state in r.nics.values() if state == "up"} == set(vm.nics.values())
            memory = (vm.memory - RESERVE) * 1024 < r.mem_kb <= vm.memory * 1024
            return sizes and macs and len(r.nics) == len(vm.nics) and r.cpus == vm.cores and memory

        host.guest(vm.name).wait_report(matches, timeout=300, what=f"{vm.name} as its manifest says after "
                                        f"{' / '.join(log)}: {vm}")
    for name in world.deleted:
        disks = host.state / "disks" / name
        assert disks.is_dir() and any(disks.iterdir()), f"deleting {name}'s manifest deleted its disks"


def run_state(host: Host, world: World, log: list[str]) -> list[dict[str, Any]]:
    """Apply one valid state and check the plan/apply property; returns apply's documents."""
    pids = {name: host.running_pid(name) for name in world.vms}
    plan, applied = plan_then_apply(host, False, log)
    documents = [applied]
    restarts = {c["name"] for c in plan["changes"] if c["pendingRestart"]}
    for name in restarts:
        kinds = [kind for kind, _, _ in planned_steps(plan).get(name, [])]
        assert "stop" not in kinds, f"{name}: a restart without --allow-restart"
        assert host.running_pid(name) == pids[name], f"{name} was restarted without --allow-restart"
    if restarts:
        assert applied["after"] is None or not applied["after"]["complete"]
        assert host.plan_exit() == 2, "a pending restart must leave the plan non-empty"
        plan, applied = plan_then_apply(host, True, log)
        documents.append(applied)
        assert {c["name"] for c in plan["changes"] if c["action"] == "restart"} >= restarts & {
            vm.name for vm in world.vms.values() if vm.running}
    if applied["after"] is not None:
        assert applied["after"]["converged"] and applied["after"]["complete"], applied["after"]
    exit_code = host.plan_exit()
    assert exit_code == 0, f"plan not empty after apply ({exit_code}) after {' / '.join(log)}:\n" + host.cli(
        "plan", str(host.manifests)).stdout
    return documents


def check_events(host: Host, documents: list[dict[str, Any]]) -> None:
    """The status store recorded the same steps, per VM and in order, as apply's documents said it ran."""
    said: dict[str, list[str]] = defaultdict(list)
    for document in documents:
        for step in document["executed"]:
            said[step["name"]].append(step["kind"])
    recorded: dict[str, list[str]] = defaultdict(list)
    for event in host.events():
        recorded[str(event["vm"])].append(str(event["kind"]))
    assert dict(recorded) == dict(said)


@pytest.mark.timeout(TIMEOUT)
@seed(SEED)
@settings(max_examples=EXAMPLES, deadline=None, phases=PHASES, database=None, print_blob=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_apply_does_exactly_the_plan_and_converges(guest_image: Path, data: st.DataObject) -> None:
    world = World()
    with fresh_host() as host:
        for _ in range(data.draw(st.integers(1, 3), label="VMs")):
            write(host, world.new_vm(data))
        log = [f"create {', '.join(f'{vm}' for vm in world.vms.values())}"]
        print(f"example: {log[0]}")
        documents = run_state(host, world, log)
        check_guests(host, world, log)
        for state in range(STATES):
            # 1 in 5 states is an invalid edit (the highest draw: hypothesis starts from the lowest ones).
            if data.draw(st.integers(0, 4), label="invalid?") == 4:
                check_invalid(host, world, data, log)
                continue
            before = set(world.vms)
            log.append("; ".join(edit(world, data, state) for _ in range(data.draw(st.integers(1, 2), label="edits"))))
            print(f"  state: {log[-1]}")
            for name in before - set(world.vms):
                (host.manifests / f"{name}.yaml").unlink()
            for vm in world.vms.values():
                write(host, vm)
            documents += run_state(host, world, log)
            check_guests(host, world, log)
        check_events(host, documents)
