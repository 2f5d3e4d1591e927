"""Run a Plan: each VM's steps in order, VMs one after another, every step re-checking before it acts.

A failing step stops that VM's remaining steps (they depended on it) and the run goes on with the next
VM, so one broken VM never blocks the others. ``INFINIZATION_CRASH_AT=before:KIND`` or ``after:KIND``
(KIND a step kind such as ``start``) makes the process SIGKILL itself at that point: the fault injection
the crash-safety tests use to prove that a re-run converges.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.apply import disks, files, hostnet, hotplug, vmprocess
from reconciler.apply.errors import StepFailed
from reconciler.observe import monitor, processes
from reconciler.observe.records import read_network_records, read_record
from reconciler.plan.actions import Change, Plan, Step, StepKind
from reconciler.plan.observed import NetworkRecord
from reconciler.spec.layout import StateLayout, VMPaths
from reconciler.spec.models import Network, VirtualMachine

CRASH_ENV = "INFINIZATION_CRASH_AT"


@dataclass(frozen=True)
class StepResult:
    step: Step
    ok: bool
    detail: str
    seconds: float


@dataclass
class ApplyResult:
    results: list[StepResult] = field(default_factory=list)
    failed_vms: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed_vms


Reporter = Callable[[StepResult], None]


def _maybe_crash(moment: str, kind: StepKind) -> None:
    if os.environ.get(CRASH_ENV) == f"{moment}:{kind.value}":
        os.kill(os.getpid(), signal.SIGKILL)


class Executor:
    def __init__(self, layout: StateLayout, report: Reporter | None = None,
                 sources: dict[str, str] | None = None, revision: str | None = None) -> None:
        self.layout = layout
        self.report = report or (lambda result: None)
        self.sources = sources or {}
        self.revision = revision

    async def run(self, plan: Plan) -> ApplyResult:
        """Run the plan's changes in order. Fail-closed: once a bridge or firewall change has failed, no VM
        change runs after it (a VM started then could be on a bridge without its rules)."""
        outcome = ApplyResult()
        host_failed: str | None = None
        for change in plan.changes:
            if not change.steps or change.refusals:
                continue
            if host_failed and change.resource == "VirtualMachine":
                skipped = StepResult(change.steps[0], False, f"skipped: {host_failed} failed first", 0.0)
                outcome.results.append(skipped)
                self.report(skipped)
                outcome.failed_vms[change.name] = skipped.detail
                continue
            await self._run_change(change, outcome)
            if change.resource != "VirtualMachine" and change.name in outcome.failed_vms:
                host_failed = f"{change.resource} {change.name}"
        return outcome

    async def _run_change(self, change: Change, outcome: ApplyResult) -> None:
        for step in change.steps:
            began = time.monotonic()
            _maybe_crash("before", step.kind)
            try:
                detail = await self._run_step(step)
                ok = True
            except (StepFailed, monitor.MonitorError, OSError, ValueError) as exc:
                detail, ok = str(exc), False
            result = StepResult(step, ok, detail, time.monotonic() - began)
            outcome.results.append(result)
            self.report(result)
            if not ok:
                outcome.failed_vms[change.name] = f"{step.summary}: {detail}"
                return
            _maybe_crash("after", step.kind)

    async def _run_step(self, step: Step) -> str:
        paths = self.layout.vm(step.name)
        args = step.args
        if step.kind is StepKind.WRITE_RECORD:
            files.write_record(paths, VirtualMachine.model_validate(args["vm"]), self.sources.get(step.name),
                               self.revision)
            return "recorded"
        if step.kind is StepKind.CREATE_DISK:
            path = Path(args["path"])
            if path.exists():
                return "already exists (kept as it is)"
            files.claim_disk(paths, step.target)
            return disks.create(path, args.get("size"), args.get("image"), args.get("image_format", "qcow2"))
        if step.kind is StepKind.GROW_DISK_LIVE:
            return await disks.grow_live(paths.qmp, args["node"], Path(args["path"]), int(args["size"]))
        if step.kind is StepKind.GROW_DISK_OFFLINE:
            # qemu-img takes the image's write lock: it refuses an image a running QEMU has open.
            return disks.grow_offline(Path(args["path"]), int(args["size"]))
        if step.kind in _NETWORK_STEPS:
            # pyroute2's sync IPRoute refuses to run in the event loop's thread.
            return await asyncio.to_thread(self._network_step, step)
        if step.kind is StepKind.START:
            vm = self._recorded_vm(paths)
            started = await vmprocess.start(paths, vm, self._bridges(vm), vhost=Path("/dev/vhost-net").exists())
            async with monitor.session(paths.qmp) as qmp:
                extra = await hotplug.after_start(qmp, paths, vm)
            return ", ".join([started, *extra])
        if step.kind in _LIVE_STEPS:
            vm = self._recorded_vm(paths)
            async with monitor.session(paths.qmp) as qmp:
                return await _live_step(qmp, paths, vm, step, self._bridges(vm))
        if step.kind is StepKind.STOP:
            return await vmprocess.stop(paths, float(args.get("timeout", 60)))
        if step.kind is StepKind.DELETE_DISK:
            record = read_record(paths.record)
            if record is None or step.target not in record.owned_disks:
                raise StepFailed(f"disk {step.target} was not created by infinization: refusing to delete it")
            if processes.find_qemu(paths.pidfile) is not None:
                raise StepFailed("the VM is still running: refusing to delete its disk")
            return disks.delete(Path(args["path"]))
        if step.kind is StepKind.FORGET:
            if processes.find_qemu(paths.pidfile) is not None:
                raise StepFailed("the VM is still running: refusing to forget it")
            if paths.dir.exists():
                shutil.rmtree(paths.dir)
            return "forgotten"
        raise StepFailed(f"unknown step kind {step.kind}")  # pragma: no cover - the enum is closed

    def _network_step(self, step: Step) -> str:
        args = step.args
        if step.kind is StepKind.WRITE_NETWORK_RECORD:
            record = NetworkRecord(network=Network.model_validate(args["network"]))
            files.write_atomic(self.layout.network_record(step.name), record.model_dump_json(indent=2) + "\n")
            return "recorded"
        if step.kind is StepKind.ENSURE_BRIDGE:
            return hostnet.ensure_bridge(args["bridge"], args.get("address"), args.get("remove_address"),
                                         bool(args.get("ip_forward")))
        if step.kind is StepKind.DELETE_BRIDGE:
            if self.layout.network_record(step.name).exists():
                return hostnet.delete_bridge(args["bridge"])
            raise StepFailed(f"no record of Network {step.name}: refusing to delete a bridge we did not create")
        if step.kind is StepKind.FORGET_NETWORK:
            self.layout.network_record(step.name).unlink(missing_ok=True)
            return "forgotten"
        if step.kind is StepKind.APPLY_FIREWALL:
            return hostnet.apply_firewall(args["script"])
        if step.kind is StepKind.REPAIR_TAP:
            return hostnet.repair_tap(args["tap"], args["bridge"])
        if step.kind is StepKind.ENSURE_DHCP:
            return hostnet.ensure_dhcp(list(args["argv"]), Path(args["pidfile"]))
        if step.kind is StepKind.STOP_DHCP:
            return hostnet.stop_dhcp(Path(args["pidfile"]))
        raise StepFailed(f"not a network step: {step.kind}")  # pragma: no cover

    def _bridges(self, vm: VirtualMachine) -> dict[str, str]:
        """Each bridged NIC's bridge: its own, or its Network's (from the network records)."""
        records = read_network_records(self.layout)
        bridges = {}
        for nic in vm.spec.networks:
            if nic.bridge:
                bridges[nic.name] = nic.bridge
            elif nic.network:
                if nic.network not in records:
                    raise StepFailed(f"NIC {nic.name}: Network {nic.network} has not been created")
                bridges[nic.name] = records[nic.network].network.spec.bridge
        return bridges

    @staticmethod
    def _recorded_vm(paths: VMPaths) -> VirtualMachine:
        record = read_record(paths.record)
        if record is None:
            raise StepFailed("no record of this VM: the record step must run first")
        return record.vm


_NETWORK_STEPS = {
    StepKind.WRITE_NETWORK_RECORD, StepKind.ENSURE_BRIDGE, StepKind.DELETE_BRIDGE, StepKind.FORGET_NETWORK,
    StepKind.APPLY_FIREWALL, StepKind.REPAIR_TAP, StepKind.ENSURE_DHCP, StepKind.STOP_DHCP,
}

_LIVE_STEPS = {
    StepKind.HOTPLUG_DISK, StepKind.UNPLUG_DISK, StepKind.HOTPLUG_NIC, StepKind.UNPLUG_NIC, StepKind.SET_LINK,
    StepKind.SET_IO_LIMITS, StepKind.ADD_CPUS, StepKind.ADD_MEMORY, StepKind.SET_BALLOON, StepKind.HOTPLUG_CDROM,
    StepKind.UNPLUG_CDROM, StepKind.CHANGE_MEDIA,
}


async def _live_step(qmp: monitor.Monitor, paths: VMPaths, vm: VirtualMachine, step: Step,
                     bridges: dict[str, str]) -> str:
    args, target = step.args, step.target
    match step.kind:
        case StepKind.HOTPLUG_DISK:
            return await hotplug.hotplug_disk(qmp, paths, vm, target, int(args["iops"]), int(args["bps"]))
        case StepKind.UNPLUG_DISK:
            return await hotplug.unplug_disk(qmp, paths, target)
        case StepKind.HOTPLUG_NIC:
            done = await hotplug.hotplug_nic(qmp, vm, target, bridges)
            if args.get("link") == "down":
                done += ", link " + await hotplug.set_link(qmp, paths, target, False)
            return done
        case StepKind.UNPLUG_NIC:
            return await hotplug.unplug_nic(qmp, paths, target)
        case StepKind.SET_LINK:
            return await hotplug.set_link(qmp, paths, target, bool(args["up"]))
        case StepKind.SET_IO_LIMITS:
            return await hotplug.set_io_limits(qmp, target, int(args["iops"]), int(args["bps"]))
        case StepKind.ADD_CPUS:
            return await hotplug.add_cpus(qmp, int(args["count"]))
        case StepKind.ADD_MEMORY:
            return await hotplug.add_memory(qmp, int(args["size"]))
        case StepKind.SET_BALLOON:
            return await hotplug.set_balloon(qmp, paths, int(args["size"]))
        case StepKind.HOTPLUG_CDROM:
            return await hotplug.hotplug_cdrom(qmp, target, args.get("image"))
        case StepKind.UNPLUG_CDROM:
            return await hotplug.unplug_cdrom(qmp, paths, target)
        case StepKind.CHANGE_MEDIA:
            return await hotplug.change_media(qmp, target, args.get("image"))
    raise StepFailed(f"not a live step: {step.kind}")  # pragma: no cover
