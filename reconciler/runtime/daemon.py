"""``infinization sync``: the long-running reconciler that keeps a host converged with its manifests.

Level-triggered, like controller-runtime: every trigger only names what to look at (a VM, or ``HOST`` for
bridges and the firewall); each reconcile re-reads the desired state, re-observes the host and re-plans,
so a missed or duplicated event does no harm. Triggers: manifest changes (watchfiles), QMP events and
process exit of every VM (one listener each, on the VM's second monitor), netlink link events, and a
periodic full resync as a safety net. Work goes through a per-key queue (``runtime.queue``): one
reconcile per VM at a time, VMs in parallel, failures retried with exponential backoff, crash loops
slowed down. A manifest that fails to parse keeps its VMs' last good desired state: a VM is never stopped
or deleted because its file is broken. SIGTERM/SIGINT stop the daemon and leave every VM running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from qemu.qmp import QMPClient, Runstate
from watchfiles import awatch

from reconciler.apply.executor import Executor, StepResult
from reconciler.apply.lock import StateLock
from reconciler.errors import CorruptRecord
from reconciler.observe.snapshot import observe
from reconciler.plan.actions import Action, Change, Plan
from reconciler.plan.observed import ObservedState
from reconciler.plan.planner import PlanOptions, plan
from reconciler.plan.steps import StepKind
from reconciler.runtime import metrics
from reconciler.runtime.gitrev import git_dir, revision
from reconciler.runtime.queue import WorkQueue
from reconciler.runtime.store import Store, VMStatus
from reconciler.spec.loader import LoadedNetwork, LoadedVM, Source, load_directory
from reconciler.state import files
from reconciler.state.layout import StateLayout
from reconciler.state.models import FAILURES, AppliedRecord, ExitRecord

HOST = "@host"
RELEVANT_EVENTS = {"SHUTDOWN", "RESET", "STOP", "RESUME", "GUEST_PANICKED", "DEVICE_DELETED", "BLOCK_IO_ERROR",
                   "POWERDOWN"}
CRASH_WINDOW = 120.0
CRASH_LIMIT = 3
GIT_WAIT = 120.0  # a git operation holding index.lock longer than this is taken as a stale lock

log = structlog.get_logger("infinization.sync")


@dataclass
class Options:
    host: str | None = None
    dry_run: bool = False
    allow_restart: bool = False
    debounce_ms: int = 50
    resync_seconds: float = 30.0
    parallel: int = 4


@dataclass
class _Listener:
    pid: int
    task: asyncio.Task[None]
    stop: asyncio.Event


@dataclass
class _State:
    vms: dict[str, LoadedVM] = field(default_factory=dict)
    networks: dict[str, LoadedNetwork] = field(default_factory=dict)
    invalid: dict[str, list[str]] = field(default_factory=dict)  # VM -> errors while its last good is kept
    revision: str | None = None


class SyncDaemon:
    def __init__(self, directory: Path, layout: StateLayout, store: Store, options: Options) -> None:
        self.directory = directory.absolute()
        self.layout = layout
        self.store = store
        self.options = options
        self.state = _State()
        self._loaded = False
        self._git_dir: Path | None = None  # found once; looked for again while there is none
        self.queue = WorkQueue(self._reconcile, parallel=options.parallel)
        self.listeners: dict[str, _Listener] = {}
        self.restarts: dict[str, list[float]] = {}
        self._failures: dict[str, int] = {}
        self._last_errors: list[Any] = []
        self.host_lock = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- desired state -----------------------------------------------------------------------------

    def _mine(self, host: str | None) -> bool:
        return host == self.options.host

    def _baseline(self) -> _State:
        """What the daemon starts from, before its first read: what was last applied. So a file that is
        broken (or a directory that is empty) when the daemon starts keeps its VMs, exactly as if the daemon
        had seen the file good before."""
        vms = {name: LoadedVM(rec.vm, Source(str(Path(rec.source).absolute()) if rec.source else "", 1))
               for name, rec in self._records({}).items()}
        # Network records do not say which file they came from: while any file is broken, all are kept.
        networks = {name: LoadedNetwork(rec.network, Source("", 1))
                    for name, rec in files.read_network_records(self.layout).items()}
        return _State(vms=vms, networks=networks)

    def load(self) -> set[str]:
        """Re-read the manifests; keep the last good state of anything in a file that fails. Return the keys
        whose desired state changed."""
        manifests = load_directory(self.directory)
        old = self.state if self._loaded else self._baseline()
        if not manifests.files and old.vms:
            # An empty directory is a wrong mount or a checkout in progress far more often than a wish to
            # delete every VM: keep everything and say so.
            log.error("the manifest directory holds no manifests; keeping the last good desired state")
            self.store.event("-", "manifest", "error", f"{self.directory} holds no manifests: nothing deleted")
            self.state, self._loaded = old, True
            return set()
        failed = manifests.failed_files

        def broken(file: str) -> bool:  # "": a baseline entry of unknown origin, kept while any file fails
            return file in failed or (not file and bool(failed))

        metrics.MANIFEST_ERRORS.set(len(manifests.errors))
        vms: dict[str, LoadedVM] = {}
        for name, loaded in manifests.vms.items():
            if loaded.source.file not in failed and self._mine(loaded.vm.spec.host):
                vms[name] = loaded
        invalid: dict[str, list[str]] = {}
        for name, loaded in old.vms.items():
            if name not in vms and broken(loaded.source.file):
                vms[name] = loaded  # its file is broken: keep the last good desired state
                invalid[name] = [str(e) for e in manifests.errors
                                 if e.file == loaded.source.file or (not loaded.source.file and e.file in failed)]
        networks = {n: net for n, net in manifests.networks.items() if net.source.file not in failed}
        for name, kept in old.networks.items():
            if name not in networks and broken(kept.source.file):
                networks[name] = kept
        for error in manifests.errors:
            log.warning("manifest error", error=str(error))
        if manifests.errors and manifests.errors != self._last_errors:
            for error in manifests.errors:
                self.store.event("-", "manifest", "error", str(error))
        self._last_errors = manifests.errors
        self._loaded = True
        self.state = _State(vms=vms, networks=networks, invalid=invalid, revision=revision(self.directory))
        changed = {name for name in set(vms) | set(old.vms)
                   if (vms.get(name) and vms[name].vm) != (old.vms.get(name) and old.vms[name].vm)}
        changed |= set(invalid) ^ set(old.invalid)
        if {n: net.network for n, net in networks.items()} != {n: net.network for n, net in old.networks.items()}:
            changed |= {HOST, *vms}
        return changed

    async def _wait_for_git(self) -> None:
        """Act only on a complete tree: while git rewrites the directory (checkout, pull), wait for it."""
        if self._git_dir is None:
            self._git_dir = await asyncio.to_thread(git_dir, self.directory)
        if self._git_dir is None:
            return
        lock = self._git_dir / "index.lock"
        if not lock.exists():
            return
        log.info("a git operation is rewriting the manifests; waiting for it to finish")
        self.store.event("-", "manifest", "waiting", "a git operation is in progress (index.lock): the manifests "
                         "are read once it finishes")
        deadline = time.monotonic() + GIT_WAIT
        while lock.exists():
            if time.monotonic() > deadline:
                log.warning("git's index.lock is still there; reading the manifests anyway", seconds=GIT_WAIT)
                self.store.event("-", "manifest", "error", f"index.lock held for over {GIT_WAIT:g}s: stale? "
                                 "reading the manifests anyway")
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 0.05)
            if self.stopping.is_set():
                return

    def _reload(self) -> set[str]:
        """``load`` for the watch and resync loops: an unexpected failure is reported and the last good
        state kept; it must never end the loop that keeps the host converged."""
        try:
            return self.load()
        except Exception as exc:
            log.exception("reading the manifests failed; keeping the last good desired state")
            self.store.event("-", "manifest", "error", f"reading the manifests failed: {type(exc).__name__}: {exc}")
            if not self._loaded:  # never run on an empty desired state: it would read as "delete every VM"
                self.state, self._loaded = self._baseline(), True
            return set()

    # -- reconcile ---------------------------------------------------------------------------------

    async def _reconcile(self, key: str) -> float | None:
        began = time.monotonic()
        try:
            retry = await self._reconcile_once(key)
        except Exception as exc:  # one broken VM must never stop the daemon
            log.exception("reconcile crashed", vm=key)
            self.store.event(key, "reconcile", "error", f"{type(exc).__name__}: {exc}")
            retry = self._backoff(key)
            if key != HOST:  # the status must not go on saying Ready
                self.store.set_status(VMStatus(vm=key, phase="Unknown", pid=None, revision=self.state.revision,
                                               conditions={"Failed": f"{type(exc).__name__}: {exc}"},
                                               last_reconcile=time.time(), duration_ms=0.0, result="failed"))
        metrics.RECONCILE_SECONDS.labels("host" if key == HOST else "vm").observe(time.monotonic() - began)
        return retry

    def _backoff(self, key: str) -> float:
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        return float(min(60, 2 ** (failures - 1)))

    async def _snapshot(self, only: set[str]) -> tuple[Plan, ObservedState]:
        desired = {name: loaded.vm for name, loaded in self.state.vms.items()}
        networks = {name: loaded.network for name, loaded in self.state.networks.items()}
        corrupt: dict[str, str] = {}
        records = self._records(corrupt)
        if mine := sorted(only & set(corrupt)):
            raise CorruptRecord(f"{corrupt[mine[0]]} (fix or remove it by hand; the VM is left as it is)")
        observed = await observe(self.layout, desired, records, networks, only=only)
        result = plan(desired, observed, records, networks=networks, manifest_dir=str(self.directory),
                      options=PlanOptions(allow_restart=self.options.allow_restart))
        # Returned, never stored on self: reconciles of different keys run concurrently.
        return result, observed

    async def _reconcile_once(self, key: str) -> float | None:
        began = time.monotonic()
        only = set() if key == HOST else {key}
        current, observed = await self._snapshot(only)
        host_changes = [c for c in current.changes if c.resource != "VirtualMachine" and c.steps]
        vm_change = current.change(key) if key != HOST else None
        if vm_change is not None and vm_change.resource != "VirtualMachine":
            vm_change = None
        delay = self._crash_loop_delay(key, vm_change, observed)
        if delay is not None:
            vm_change = None
        work = [c for c in [*host_changes, vm_change] if c is not None and c.steps]
        if work:
            metrics.DRIFT.labels("host" if key == HOST else "vm").inc()
        failed = False
        if work and self.options.dry_run:
            for change in work:
                self.store.event(change.name, f"would-{change.action.value}", "dry-run",
                                 "; ".join(step.summary for step in change.steps))
                log.info("dry-run: would apply", vm=change.name, action=change.action.value,
                         steps=[s.kind.value for s in change.steps])
        elif work:
            failed = not await self._execute(work, current)
        unstarted = False
        if key != HOST:
            unstarted = await self._report(key, time.monotonic() - began, failed, delay)
        if failed:
            return self._backoff(key)
        if unstarted and delay is None and not self.options.dry_run:
            # Its QEMU died between our start and this look, before any listener could follow it: nothing
            # else would bring us back before the next resync. Look again soon (with backoff: no hot loop).
            return self._backoff(key)
        self._failures.pop(key, None)
        return delay

    async def _execute(self, changes: list[Change], current: Plan) -> bool:
        sources = {n: loaded.source.file for n, loaded in self.state.vms.items()}

        def report(result: StepResult) -> None:
            outcome = "ok" if result.ok else "failed"
            metrics.ACTIONS.labels(result.step.kind.value, outcome).inc()
            self.store.event(result.step.name, result.step.kind.value, outcome,
                             f"{result.step.summary}: {result.detail}", result.seconds * 1000)
            log.info("action", vm=result.step.name, action=result.step.kind.value, result=outcome,
                     duration_ms=round(result.seconds * 1000, 1), detail=result.detail)

        executor = Executor(self.layout, report, sources, revision=self.state.revision)
        host_part = [c for c in changes if c.resource != "VirtualMachine"]
        vm_part = [c for c in changes if c.resource == "VirtualMachine"]
        ok = True
        if host_part:
            async with self.host_lock:
                ok = (await executor.run(current.model_copy(update={"changes": host_part}))).ok
        if vm_part and ok:
            ok = (await executor.run(current.model_copy(update={"changes": vm_part}))).ok
        return ok

    def _crash_loop_delay(self, key: str, change: Change | None, observed: ObservedState) -> float | None:
        """Restarts after failures are rate-limited: past CRASH_LIMIT within CRASH_WINDOW, wait longer."""
        if change is None or not any(step.kind is StepKind.START for step in change.steps):
            return None
        last_exit = observed.vm(key).last_exit
        # A reconcile can run before the exit listener has written exit.json (a resync, an event of the
        # dying QEMU): an unknown end of a VM we already ran counts as a failure here.
        unknown = last_exit is None and change.action is not Action.CREATE
        if last_exit not in FAILURES and not unknown:
            return None
        now = time.time()  # wall clock: the history outlives this daemon (restarts.json)
        recent = [t for t in self._restart_history(key) if 0 <= now - t < CRASH_WINDOW]
        if len(recent) >= CRASH_LIMIT:
            delay = float(min(300, 10 * 2 ** (len(recent) - CRASH_LIMIT)))
            if now - recent[-1] < delay:
                self.store.event(key, "crash-loop", "backoff", f"restarted {len(recent)} times in "
                                 f"{CRASH_WINDOW:g}s; next try in {delay - (now - recent[-1]):.0f}s")
                return delay - (now - recent[-1])
        recent.append(now)
        self.restarts[key] = recent
        with contextlib.suppress(OSError):
            files.write_restarts(self.layout.vm(key), recent)
        return None

    def _restart_history(self, key: str) -> list[float]:
        """Restarts after failures, newest last; read from the VM's folder the first time, so a daemon
        restarted in the middle of a crash loop keeps backing off."""
        if key not in self.restarts:
            self.restarts[key] = files.read_restarts(self.layout.vm(key))
        return self.restarts[key]

    async def _report(self, name: str, seconds: float, failed: bool, backoff: float | None) -> bool:
        """Write the VM's status as it is after the reconcile; True when it is still to be started."""
        after, observed = await self._snapshot({name})
        change = after.change(name)
        vm = observed.vm(name)
        if name not in self.state.vms and (change is None or not change.steps) and vm.process is None:
            self.store.forget(name)
            return False
        conditions: dict[str, str] = {}
        in_sync = change is None or not (change.steps or change.pending_restart or change.refusals)
        if in_sync and not failed:
            conditions["Ready"] = ""
        if change is not None and change.steps:  # still different after this reconcile (dry run, failure, backoff)
            conditions["Drifted"] = f"{change.action.value}: " + "; ".join(step.summary for step in change.steps)
        if change is not None and change.pending_restart:
            conditions["RestartRequired"] = "; ".join(change.pending_restart)
        if change is not None and change.refusals:
            conditions["Refused"] = "; ".join(change.refusals)
        if change is not None and change.unplug_pending:
            conditions["UnplugPending"] = "; ".join(change.unplug_pending)
        if failed:
            conditions["Failed"] = "the last reconcile failed (see events)"
        if backoff is not None:
            conditions["CrashLoopBackOff"] = f"next start in {backoff:.0f}s"
        if name in self.state.invalid:
            conditions["ManifestInvalid"] = "keeping the last good spec: " + "; ".join(self.state.invalid[name])
        phase = "Running" if vm.process else "Stopped"
        self.store.set_status(VMStatus(vm=name, phase=phase, pid=vm.process.pid if vm.process else None,
                                       revision=self.state.revision, conditions=conditions,
                                       last_reconcile=time.time(), duration_ms=seconds * 1000,
                                       result="failed" if failed else "ok"))
        if vm.process is not None:
            self._ensure_listener(name, vm.process.pid)
        # No process seen: the listener is left alone. It ends by itself when its QEMU exits (pidfd), and
        # stopping it on a momentary miss (a QEMU that is exiting has an empty /proc cmdline) would let a
        # second listener for the same QEMU start and report its exit again, without its SHUTDOWN.
        return change is not None and any(step.kind is StepKind.START for step in change.steps)

    # -- QMP event listeners -----------------------------------------------------------------------

    def _ensure_listener(self, name: str, pid: int) -> None:
        current = self.listeners.get(name)
        if current is not None and current.pid == pid:
            # One listener per QEMU, ever: even a finished one is not replaced. A QEMU that is exiting can
            # still look alive in /proc for a moment after its pidfd fired; a second listener would then
            # report the same exit again, without its SHUTDOWN.
            return
        self._stop_listener(name)
        stop = asyncio.Event()
        self.listeners[name] = _Listener(pid, asyncio.create_task(self._listen(name, pid, stop)), stop)

    def _stop_listener(self, name: str) -> asyncio.Task[None] | None:
        """Ask a listener to close its QMP connection cleanly (not a cancel: qemu.qmp dislikes that)."""
        listener = self.listeners.pop(name, None)
        if listener is None:
            return None
        listener.stop.set()
        return listener.task

    async def _listen(self, name: str, pid: int, stop: asyncio.Event) -> None:
        """Follow one QEMU: its QMP events, and its exit (pidfd: works for a daemonized QEMU too)."""
        paths = self.layout.vm(name)
        client = QMPClient(f"infinization-sync:{name}")
        shutdown: dict[str, Any] | None = None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            self.queue.add(name)
            return
        exited = asyncio.Event()
        assert self.loop is not None
        self.loop.add_reader(pidfd, exited.set)
        try:
            try:
                await asyncio.wait_for(client.connect(str(paths.events)), 5)
            except Exception as exc:  # still watch the process; events of this QEMU are lost, say so
                log.warning("cannot follow QMP events", vm=name, pid=pid, error=repr(exc))

            def record_exit(reason: dict[str, Any]) -> None:
                files.record_exit(paths, pid, ExitRecord(**reason))

            def handle(event: Any) -> None:
                nonlocal shutdown
                client.events._history.clear()  # qemu.qmp keeps every event forever otherwise
                kind = str(event["event"])
                data: dict[str, Any] = dict(event.get("data", {}))
                if kind == "SHUTDOWN":
                    shutdown = data
                    reason = data.get("reason", "")
                    record_exit({"reason": reason, "guest": data.get("guest")})
                elif kind == "GUEST_PANICKED":
                    record_exit({"reason": "guest-panicked"})
                if kind in RELEVANT_EVENTS:
                    self.store.event(name, "qmp-event", "info", f"{kind} {json.dumps(data)}")
                    self.queue.add(name)

            async def events() -> None:
                async for event in client.events:
                    handle(event)

            watcher = asyncio.create_task(events())
            ended = asyncio.create_task(exited.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([ended, stopped], return_when=asyncio.FIRST_COMPLETED)
            for task in (watcher, ended, stopped):
                task.cancel()
            await asyncio.gather(watcher, ended, stopped, return_exceptions=True)
            if not exited.is_set():
                return  # the daemon is stopping or moved on to a new QEMU: the VM is not our concern here
            # The process can be gone before its last events (SHUTDOWN) were handled: let the client read
            # to the end of the stream, then handle what is still queued, before calling it a crash.
            deadline = time.monotonic() + 2
            while client.runstate == Runstate.RUNNING and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            for event in client.events.clear():
                handle(event)
            if shutdown is None and (recorded := files.read_exit(paths)) is not None:
                shutdown = {"reason": recorded.reason}  # recorded for this run already: not a crash
            if shutdown is None:
                record_exit({"reason": "crash"})
                self.store.event(name, "process-exit", "failure", f"QEMU pid {pid} exited without a shutdown")
            else:
                self.store.event(name, "process-exit", "info", f"QEMU pid {pid} exited ({shutdown.get('reason')})")
            self.queue.add(name)
        finally:
            self.loop.remove_reader(pidfd)
            os.close(pidfd)
            with contextlib.suppress(Exception):
                await client.disconnect()

    # -- triggers ----------------------------------------------------------------------------------

    async def _watch_files(self) -> None:
        async for _changes in awatch(self.directory, debounce=self.options.debounce_ms, step=20,
                                     stop_event=self.stopping, recursive=True):
            await self._wait_for_git()
            for key in sorted(self._reload()):
                self.queue.add(key, urgent=True)  # a changed manifest may be the fix: skip any backoff

    async def _resync(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.options.resync_seconds)
            if self.stopping.is_set():
                return
            await self._wait_for_git()
            self._reload()
            self._enqueue_all()

    def _records(self, corrupt: dict[str, str]) -> dict[str, AppliedRecord]:
        """This host's VM records; corrupt ones are left out (into ``corrupt``), never fatal to the rest."""
        records = files.read_records(self.layout, corrupt=corrupt)
        return {name: rec for name, rec in records.items() if self._mine(rec.vm.spec.host)}

    def _enqueue_all(self) -> None:
        self.queue.add(HOST)
        corrupt: dict[str, str] = {}
        names = set(self.state.vms) | set(self._records(corrupt)) | set(corrupt)
        for name in sorted(names):
            self.queue.add(name)

    def _watch_netlink(self) -> threading.Thread:
        """Link changes (a bridge deleted, a TAP detached or down) trigger a reconcile of everything."""
        from pyroute2 import IPRoute

        def run() -> None:
            with IPRoute() as ipr:
                ipr.bind()
                while not self.stopping.is_set():
                    try:
                        messages = ipr.get()
                    except Exception:  # the socket closes when the daemon stops
                        return
                    if any(m.get("event") in ("RTM_NEWLINK", "RTM_DELLINK") for m in messages) and self.loop:
                        self.loop.call_soon_threadsafe(self._enqueue_all)

        thread = threading.Thread(target=run, name="netlink", daemon=True)
        thread.start()
        return thread

    # -- main --------------------------------------------------------------------------------------

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)
        await self._wait_for_git()
        self._reload()
        log.info("sync started", manifests=str(self.directory), state=str(self.layout.root),
                 host=self.options.host, dry_run=self.options.dry_run, revision=self.state.revision)
        self.store.event("-", "daemon", "started", f"watching {self.directory}")
        self._enqueue_all()
        tasks = [asyncio.create_task(coro) for coro in (self.queue.run(), self._watch_files(), self._resync())]
        self._watch_netlink()
        await self.stopping.wait()
        log.info("sync stopping; VMs keep running")
        closing = [task for name in list(self.listeners) if (task := self._stop_listener(name))]
        await asyncio.gather(*closing, return_exceptions=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.store.event("-", "daemon", "stopped", "VMs left running")


def run_daemon(directory: Path, layout: StateLayout, options: Options, database_url: str | None,
               metrics_address: str | None) -> int:
    structlog.configure(processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"),
                                    structlog.processors.JSONRenderer()])
    with StateLock(layout.daemon_lock, exclusive=True, wait=0), StateLock(layout.lock, exclusive=True, wait=60):
        if metrics_address:
            metrics.serve(metrics_address)
        store = Store(layout.database, host=options.host or "", database_url=database_url)
        try:
            asyncio.run(SyncDaemon(directory, layout, store, options).run())
        finally:
            store.close()
    return 0
