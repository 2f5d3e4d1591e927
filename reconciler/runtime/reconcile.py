"""The reconcile loop: one key in, the host converged for it, its status reported.

``Reconciler`` is the handler of the daemon's work queue (``runtime.queue``), which calls it with one key
at a time per key: a VM name, or ``HOST`` for bridges and the firewall. One reconcile: take the desired
state from the cache (``runtime.cache``), observe that VM (plus host networking), plan with the same pure
planner as the CLI, hold back a crash-looping restart (``runtime.crashloop``), execute that VM's change and
any host-level change, then observe again and write the VM's status (``runtime.status``) to the store.

What it returns tells the queue what comes next, by the failure's behaviour (``reconciler.errors``):

- None: done (or a crash-loop delay, as a float, after which the start is tried again).
- a float: retry with exponential backoff (max 60 s): a ``Temporary`` error, a step that failed this
  time, or anything unexpected.
- ``Park``: a ``Permanent`` failure (a corrupt record, a step the executor refused): retrying cannot help.
  The key is reported Failed and sleeps until its manifest changes (the file watcher's urgent trigger),
  its record file is edited or its QEMU comes or goes (checked whenever a resync or an event triggers it).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from reconciler.adapters import procfs
from reconciler.apply.executor import ApplyResult, Executor, StepResult
from reconciler.errors import CorruptRecord, Permanent
from reconciler.observe.snapshot import observe
from reconciler.plan.actions import Change, Plan
from reconciler.plan.observed import ObservedState
from reconciler.plan.planner import PlanOptions, plan
from reconciler.plan.steps import StepKind
from reconciler.runtime import metrics, status
from reconciler.runtime.cache import HOST, DesiredCache
from reconciler.runtime.crashloop import CRASH_WINDOW, CrashLoops, counts_as_restart
from reconciler.runtime.hostfacts import CachedHostFacts
from reconciler.runtime.listeners import QMPListeners
from reconciler.runtime.queue import Park
from reconciler.runtime.store import Store
from reconciler.spec import macs
from reconciler.spec.host import HostConfig
from reconciler.state import files
from reconciler.state.layout import StateLayout

MAX_BACKOFF = 60
# Steps that touch neither links nor nftables (a QEMU's devices, disk files, records): after them the host
# facts kept between events stay valid. Any other step (a start makes TAPs, a stop removes them...) drops them.
LEAVES_HOST_NETWORK = frozenset({
    StepKind.WRITE_RECORD, StepKind.CREATE_DISK, StepKind.GROW_DISK_LIVE, StepKind.GROW_DISK_OFFLINE,
    StepKind.HOTPLUG_DISK, StepKind.UNPLUG_DISK, StepKind.SET_IO_LIMITS, StepKind.ADD_CPUS, StepKind.ADD_MEMORY,
    StepKind.SET_BALLOON, StepKind.HOTPLUG_CDROM, StepKind.UNPLUG_CDROM, StepKind.CHANGE_MEDIA,
    StepKind.RECORD_DISPLAY_PORT,
})
NEEDS_A_PERSON = "needs a person: not retried until its manifest or its record changes"

log = structlog.get_logger("infinization.sync")


@dataclass(frozen=True)
class _Applied:
    failure: str | None = None  # None: nothing failed
    permanent: bool = False  # this key's own change failed for good


def _vm_change(current: Plan, key: str) -> Change | None:
    """The change of VM ``key`` in the plan (none for ``HOST``, nor for a Network of the same name)."""
    change = current.change(key) if key != HOST else None
    return change if change is not None and change.resource == "VirtualMachine" else None


def _failure_text(applied: _Applied) -> str | None:
    """What the status says of a failed change: one that needs a person says which and why."""
    if applied.failure is None:
        return None
    return f"{applied.failure} ({NEEDS_A_PERSON})" if applied.permanent else status.FAILED


class Reconciler:
    def __init__(self, cache: DesiredCache, layout: StateLayout, store: Store, listeners: QMPListeners, *,
                 dry_run: bool = False, allow_restart: bool = False, config: HostConfig | None = None,
                 prune_other_sources: bool = False, facts: CachedHostFacts | None = None) -> None:
        self.cache, self.layout, self.store, self.listeners = cache, layout, store, listeners
        self.dry_run, self.allow_restart = dry_run, allow_restart
        self.prune_other_sources = prune_other_sources
        self.config = config or HostConfig()  # the host's policy, for the planner and the executor
        self.crashloops = CrashLoops(layout)
        # Host-wide facts: the daemon's are kept between events (runtime.hostfacts); told of our own changes.
        self.facts = facts or CachedHostFacts(max_age=0.0)
        self.host_lock = asyncio.Lock()  # host changes (bridges, firewall) run one at a time
        self._failures: dict[str, int] = {}

    async def __call__(self, key: str) -> float | Park | None:
        began = time.monotonic()
        retry: float | Park | None
        try:
            retry = await self._once(key)
        except Permanent as exc:
            retry = self._failed_for_good(key, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # one broken VM must never stop the daemon
            message = f"{type(exc).__name__}: {exc}"
            log.exception("reconcile crashed", vm=key, error=message)
            self.store.event(key, "reconcile", "error", message)
            retry = self._backoff(key)
            if key != HOST:  # the status must not go on saying Ready
                self.store.set_status(status.crashed_status(key, message, self.cache.state.revision, time.time()))
                metrics.vm_reported(key, "Unknown", ready=False)
        metrics.RECONCILE_SECONDS.labels("host" if key == HOST else "vm").observe(time.monotonic() - began)
        return retry

    def _backoff(self, key: str) -> float:
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        return float(min(MAX_BACKOFF, 2 ** (failures - 1)))

    def _failed_for_good(self, key: str, message: str) -> float | Park:
        """A Permanent error before any report (a corrupt record): say so and park the key."""
        log.error("reconcile failed; needs a person", vm=key, error=message)
        self.store.event(key, "reconcile", "error", f"{message} ({NEEDS_A_PERSON})")
        if key == HOST:  # host records carry no stamp to wait on: keep retrying, slowly
            return self._backoff(key)
        self.store.set_status(status.crashed_status(key, message, self.cache.state.revision, time.time()))
        metrics.vm_reported(key, "Unknown", ready=False)
        return self._park(key)

    def _park(self, key: str) -> Park:
        """Hold the key until its record file is edited or its QEMU comes or goes (a crash of a parked VM
        is news the next reconcile must see); its manifest changing wakes it through the queue."""
        paths = self.layout.vm(key)

        def fingerprint() -> tuple[tuple[int, int] | None, int | None]:
            # Any live process the pidfile names, adopted or not: one coming or going is news.
            return files.record_stamp(paths), procfs.examine(paths).pid

        parked = fingerprint()
        return Park(lambda: fingerprint() != parked)

    async def _snapshot(self, only: set[str], took: dict[str, float] | None = None) -> tuple[Plan, ObservedState]:
        """Observe and plan the VMs in ``only`` (none for ``HOST``) and the host's networks; ``took`` gets the
        milliseconds the observation and the plan took."""
        began = time.monotonic()
        state = self.cache.state
        desired = {name: loaded.vm for name, loaded in state.vms.items()}
        networks = {name: loaded.network for name, loaded in state.networks.items()}
        corrupt: dict[str, str] = {}
        records = self.cache.records(corrupt)
        desired, resolved = macs.resolve(desired, {name: record.vm for name, record in records.items()})
        records = {name: record.model_copy(update={"vm": resolved[name]}) for name, record in records.items()}
        if mine := sorted(only & set(corrupt)):
            raise CorruptRecord(f"{corrupt[mine[0]]} (fix or remove it by hand; the VM is left as it is)")
        observed = await observe(self.layout, desired, records, networks, only=only, host=self.config,
                                 facts=self.facts)
        planning = time.monotonic()
        result = plan(desired, observed, records, networks=networks, manifest_dir=str(self.cache.directory),
                      options=PlanOptions(allow_restart=self.allow_restart,
                                          prune_other_sources=self.prune_other_sources), host=self.config,
                      only=only)  # the other VMs were not observed: planning them would be N x N work a resync
        if took is not None:
            took["observe_ms"] = round((planning - began) * 1000, 1)
            took["plan_ms"] = round((time.monotonic() - planning) * 1000, 1)
        # Returned, never stored on self: reconciles of different keys run concurrently.
        return result, observed

    def _crash_loop_wait(self, key: str, change: Change | None, observed: ObservedState) -> float | None:
        """Restarts after failures are rate-limited (``runtime.crashloop``): the seconds to wait, or None."""
        if not counts_as_restart(change, observed.vm(key).last_exit):
            return None
        decision = self.crashloops.gate(key)
        if decision.wait is not None:
            self.store.event(key, "crash-loop", "backoff", f"restarted {len(decision.history)} times in "
                             f"{CRASH_WINDOW:g}s; next try in {decision.wait:.0f}s")
        return decision.wait

    async def _once(self, key: str) -> float | Park | None:
        began = time.monotonic()
        took: dict[str, float] = {}  # where the time went, for the log (an operator's first question)
        current, observed = await self._snapshot(set() if key == HOST else {key}, took)
        vm_change = _vm_change(current, key)
        delay = self._crash_loop_wait(key, vm_change, observed)
        if delay is not None:
            vm_change = None
        host_changes = [c for c in current.changes if c.resource != "VirtualMachine" and c.steps]
        work = [c for c in [*host_changes, vm_change] if c is not None and c.steps]
        acting = time.monotonic()
        applied = await self._act(key, work, current)
        took["act_ms"] = round((time.monotonic() - acting) * 1000, 1)
        unstarted = False
        if key != HOST:
            reporting = time.monotonic()
            # Nothing was done (every resync, for every VM): what was just observed is the status to write.
            seen = (current, observed) if not work or self.dry_run else None
            unstarted = await self._report(key, time.monotonic() - began, _failure_text(applied), delay, seen)
            took["report_ms"] = round((time.monotonic() - reporting) * 1000, 1)
        if work:  # a no-op (every resync, for every VM) is not worth a line
            log.info("reconciled", vm=key, steps=sum(len(c.steps) for c in work),
                     duration_ms=round((time.monotonic() - began) * 1000, 1), **took)
        if applied.permanent:
            return self._park(key)
        if applied.failure is not None:
            return self._backoff(key)
        if unstarted and delay is None and not self.dry_run:
            # Its QEMU died between our start and this look, before any listener could follow it: nothing
            # else would bring us back before the next resync. Look again soon (with backoff: no hot loop).
            return self._backoff(key)
        self._failures.pop(key, None)
        return delay

    async def _act(self, key: str, work: list[Change], current: Plan) -> _Applied:
        if not work:
            return _Applied()
        for change in work:
            if change.drifted:
                metrics.DRIFT.labels(change.resource).inc()
                # What moved, in the event log too: a VM resumed or paused by hand, a TAP deleted...
                moved = [f"{f.path}: {f.before} -> {f.after}" for f in change.fields if f.drift]
                self.store.event(change.name, "drift", "detected",
                                 "; ".join(moved or [step.summary for step in change.steps]))
        if self.dry_run:
            for change in work:
                self.store.event(change.name, f"would-{change.action.value}", "dry-run",
                                 "; ".join(step.summary for step in change.steps))
                log.info("dry-run: would apply", vm=change.name, action=change.action.value,
                         steps=[s.kind.value for s in change.steps])
            return _Applied()
        try:
            result = await self._execute(work, current)
        finally:
            # Our own steps may have changed links or the firewall: what was kept is read again, unless every
            # step is one that cannot (a disk grown, a record written: the common live edit).
            if any(step.kind not in LEAVES_HOST_NETWORK for change in work for step in change.steps):
                self.facts.changed()
        if result.ok:
            return _Applied()
        failure = result.failed_vms.get(key) or "; ".join(result.failed_vms.values())
        return _Applied(failure=failure, permanent=key != HOST and key in result.permanent)

    def _report_step(self, result: StepResult) -> None:
        outcome = "ok" if result.ok else "failed"
        metrics.ACTIONS.labels(result.step.kind.value, outcome).inc()
        self.store.event(result.step.name, result.step.kind.value, outcome,
                         f"{result.step.summary}: {result.detail}", result.seconds * 1000)
        log.info("action", vm=result.step.name, action=result.step.kind.value, result=outcome,
                 duration_ms=round(result.seconds * 1000, 1), detail=result.detail)

    async def _execute(self, changes: list[Change], current: Plan) -> ApplyResult:
        """Host changes first (under the host lock), then the VM's, only if the host's went well."""
        sources = {n: loaded.source.file for n, loaded in self.cache.state.vms.items()}
        executor = Executor(self.layout, self._report_step, sources, revision=self.cache.state.revision,
                            host=self.config)
        host_part = [c for c in changes if c.resource != "VirtualMachine"]
        vm_part = [c for c in changes if c.resource == "VirtualMachine"]
        outcome = ApplyResult()
        if host_part:
            async with self.host_lock:
                outcome = await executor.run(current.model_copy(update={"changes": host_part}))
        if vm_part and outcome.ok:
            vm = await executor.run(current.model_copy(update={"changes": vm_part}))
            outcome = ApplyResult(results=[*outcome.results, *vm.results], failed_vms=vm.failed_vms,
                                  permanent=outcome.permanent | vm.permanent)
        return outcome

    async def _report(self, name: str, seconds: float, failure: str | None, backoff: float | None,
                      seen: tuple[Plan, ObservedState] | None = None) -> bool:
        """Write the VM's status as it is after the reconcile (``seen``: the snapshot taken before it, when
        nothing was done since); True when it is still to be started."""
        after, observed = seen or await self._snapshot({name})
        change = after.change(name)
        vm = observed.vm(name)
        state = self.cache.state
        if status.gone(name in state.vms, change, vm):
            self.store.forget(name)
            metrics.vm_forgotten(name)
            return False
        outcome = status.Outcome(failure=failure, backoff=backoff, invalid=tuple(state.invalid.get(name, ())),
                                 revision=state.revision, seconds=seconds)
        row = status.vm_status(name, change, vm, outcome, time.time())
        self.store.set_status(row)
        metrics.vm_reported(name, row.phase, "Ready" in row.conditions)
        if vm.process is not None:
            self.listeners.ensure(name, vm.process.pid)
        # No process seen: the listener is left alone (see runtime.listeners: one listener per QEMU, ever).
        return change is not None and any(step.kind is StepKind.START for step in change.steps)
