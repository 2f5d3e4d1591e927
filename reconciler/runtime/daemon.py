"""``infinization sync``: the long-running reconciler that keeps a host converged with its manifests.

Level-triggered, like controller-runtime: every trigger only names what to look at (a VM, or ``HOST`` for
bridges and the firewall); each reconcile takes the desired state, observes that VM (with the host facts
kept current by events) and re-plans, so a duplicated event does no harm, and the periodic full resync
(every file, record and host fact read again) repairs anything an event missed. This module only wires
the parts together; ``run_daemon`` is called by the CLI (``infinization sync``):

- ``runtime.cache``: the desired state (manifests of this host, last good spec of broken files, git wait),
  re-reading only the files an event names and the records that changed;
- ``runtime.hostfacts``: host-wide facts (links, nftables) kept between the netlink and ``nft monitor``
  events that change them, so one VM's reconcile observes that VM and little else;
- ``runtime.listeners``: triggers: QMP events and process exit of every VM (one listener each), netlink
  link events; ``runtime.filewatch``: manifest changes (inotify); plus a periodic full resync here, as a
  safety net;
- ``runtime.queue``: one reconcile per key at a time, keys in parallel, backoff, parking;
- ``runtime.reconcile``: one reconcile (with ``runtime.crashloop`` and ``runtime.status``);
- ``runtime.service``: readiness, status and watchdog for systemd (``Type=notify``).

SIGTERM/SIGINT stop the daemon and leave every VM running; SIGHUP runs the full resync now.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from reconciler.apply.lock import StateLock
from reconciler.hostnet.nftables import firewall_table
from reconciler.runtime import dsn, links, metrics
from reconciler.runtime.cache import HOST, DesiredCache
from reconciler.runtime.filewatch import watch_files
from reconciler.runtime.hostfacts import CachedHostFacts, NftMonitor
from reconciler.runtime.listeners import QMPListeners, watch_netlink
from reconciler.runtime.queue import Park, WorkQueue
from reconciler.runtime.reconcile import Reconciler
from reconciler.runtime.sdnotify import Notifier
from reconciler.runtime.service import ServiceNotifier
from reconciler.runtime.store import RETENTION_DAYS, Store
from reconciler.spec.host import HostConfig
from reconciler.state import files
from reconciler.state.layout import StateLayout

log = structlog.get_logger("infinization.sync")


@dataclass
class Options:
    host: str | None = None
    dry_run: bool = False
    allow_restart: bool = False
    prune_other_sources: bool = False  # delete VMs last applied from another directory (default: kept)
    debounce_ms: int = 0  # extra wait after a file event for more (CLOSE_WRITE already means "written")
    # The safety net for changes no event reports (a record or pidfile deleted by hand, a thread moved by
    # taskset, a display password file edited): events cover the rest. Flux's usual interval; each pass costs
    # every VM one observation (docs/performance.md: the idle daemon).
    resync_seconds: float = 600.0
    parallel: int = 4
    config: HostConfig = field(default_factory=HostConfig)  # the host's policy (storage roots, QEMU user...)


class SyncDaemon:
    def __init__(self, directory: Path, layout: StateLayout, store: Store, options: Options) -> None:
        self.store = store
        self.options = options
        self.stopping = asyncio.Event()
        self.resync_now = asyncio.Event()  # SIGHUP (or stopping): end the wait for the next full resync
        self.cache = DesiredCache(directory, layout, store, options.host)
        self.listeners = QMPListeners(layout, store, trigger=lambda key: self.queue.add(key))
        self.facts = CachedHostFacts(max_age=options.resync_seconds)  # host-wide facts, kept between events
        self.reconciler = Reconciler(self.cache, layout, store, self.listeners, dry_run=options.dry_run,
                                     config=options.config, facts=self.facts,
                                     allow_restart=options.allow_restart,
                                     prune_other_sources=options.prune_other_sources)
        self.queue = WorkQueue(self._reconcile, parallel=options.parallel)
        # Read (and removed from the environment) before any child process is started.
        self.service = ServiceNotifier(Notifier.from_environment(),
                                       queued=lambda: len(set(self.queue.pending()) | set(self.queue.held())))

    async def _reconcile(self, key: str) -> float | Park | None:
        try:
            return await self.reconciler(key)
        finally:
            self.service.reconciled(key)

    def enqueue_all(self) -> list[str]:
        """Every key: the host, every desired VM and every VM we have a folder for (even a corrupt one)."""
        corrupt: dict[str, str] = {}
        keys = [HOST, *sorted(set(self.cache.state.vms) | set(self.cache.records(corrupt)) | set(corrupt))]
        for key in keys:
            self.queue.add(key)
        return keys

    def _link_keys(self) -> dict[str, set[str]]:
        """Our interfaces and the keys they concern (``runtime.links``)."""
        state = self.cache.state
        recorded = {name: record.network for name, record in files.read_network_records(self.cache.layout).items()}
        vms = [*(loaded.vm for loaded in state.vms.values()),
               *(record.vm for record in self.cache.records({}).values())]
        return links.link_keys(vms, {name: loaded.network for name, loaded in state.networks.items()}, recorded, HOST)

    def _on_links(self, names: set[str] | None) -> None:
        """Netlink: interfaces ``names`` changed (None: unknown ones). Only ours wake keys (a TAP its VM, a
        bridge the host); another program's interfaces coming and going wake nothing (the resync would still
        see anything missed). Host facts kept with any of them are dropped (``runtime.hostfacts``)."""
        self.facts.links_changed(names)
        if names:
            for key in links.woken(names, self._link_keys()):
                self.queue.add(key)

    def _stop(self) -> None:
        if not self.stopping.is_set():
            self.service.stopping()
        self.stopping.set()
        self.resync_now.set()

    async def _on_files_changed(self, changed: set[str] | None) -> None:
        await self.cache.wait_for_git(self.stopping)
        for key in sorted(await self.cache.reload_async(changed)):
            self.queue.add(key, urgent=True)  # a changed manifest may be the fix: skip any backoff or parking

    async def _resync(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.resync_now.wait(), self.options.resync_seconds)
            self.resync_now.clear()
            if self.stopping.is_set():
                return
            log.info("full resync")
            await self.cache.wait_for_git(self.stopping)
            self.cache.forget()  # level-triggered: every file, record and host fact is read again
            self.facts.forget()
            await self.cache.reload_async()
            self.enqueue_all()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop)
        loop.add_signal_handler(signal.SIGHUP, self.resync_now.set)
        watchdog = asyncio.create_task(self.service.watchdog(self.stopping))  # from the start: systemd's is on
        await self.cache.wait_for_git(self.stopping)
        await self.cache.reload_async()
        log.info("sync started", manifests=str(self.cache.directory), state=str(self.cache.layout.root),
                 host=self.options.host, dry_run=self.options.dry_run, revision=self.cache.state.revision)
        self.store.event("-", "daemon", "started", f"watching {self.cache.directory}")
        self.service.first_pass(self.enqueue_all())
        files = watch_files(self.cache.directory, self.options.debounce_ms, self._on_files_changed)
        # Our own firewall changes come back too: one no-op HOST reconcile each, the price of seeing others'.
        table = firewall_table(str(self.cache.layout.root.resolve()))
        nft = NftMonitor(self.facts, table, lambda: self.queue.add(HOST, 0.2)).run(self.stopping)  # a burst: one run
        tasks = [watchdog, *(asyncio.create_task(coro) for coro in (self.queue.run(), files, self._resync(), nft))]
        watch_netlink(self.stopping, self._on_links, self.facts)
        await self.stopping.wait()
        log.info("sync stopping; VMs keep running")
        await self.listeners.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.store.event("-", "daemon", "stopped", "VMs left running")


def run_daemon(directory: Path, layout: StateLayout, options: Options, database_url: str | None,
               metrics_address: str | None, *, retention_days: int = RETENTION_DAYS) -> int:
    structlog.configure(processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"),
                                    dsn.redact_log, structlog.processors.JSONRenderer()])
    with StateLock(layout.daemon_lock, exclusive=True, wait=0), StateLock(layout.lock, exclusive=True, wait=60):
        if metrics_address:
            metrics.serve(metrics_address)
        # `status` and `events` without a directory read the one the daemon keeps the host converged with.
        files.write_source(layout, str(directory.resolve()))
        store = Store(layout.database, host=options.host, database_url=database_url, retention_days=retention_days)
        try:
            asyncio.run(SyncDaemon(directory, layout, store, options).run())
        finally:
            store.close()
    return 0
