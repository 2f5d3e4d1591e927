"""The sync daemon's desired-state cache: what the manifests ask for on this host, and what changed.

Called by the daemon's triggers (``runtime.daemon``: start, the file watcher and the resync) through
``reload``; the reconcile loop (``runtime.reconcile``) reads ``state`` and ``records``. The rules:

- Only VMs whose ``spec.host`` is this daemon's host are ours.
- A file that fails keeps its VMs' last good spec (``runtime.desired.keep_last_good``, the one rule,
  shared with the CLI), and those VMs are reported ManifestInvalid. Before its first read the cache
  starts from the last-applied records (``runtime.desired.from_records``), so a file broken when the
  daemon starts deletes nothing.
- Networks keep their own last-good handling: their records do not say which file they came from, so
  while any file fails, every recorded Network is kept.
- A directory with no manifests at all keeps everything (a wrong mount or a checkout in progress far
  more often than a wish to delete every VM).
- While git holds ``index.lock`` (checkout, pull), nothing is read: ``wait_for_git``.
- A file event re-reads only the files it names (``runtime.manifests``) and a record is parsed again only
  when its file changed (``runtime.records``); the cross-file checks still run over the whole set. The
  periodic resync calls ``forget`` first: it reads every file and every record.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from reconciler.runtime import metrics
from reconciler.runtime.desired import from_records, keep_last_good
from reconciler.runtime.gitrev import git_dir, revision
from reconciler.runtime.manifests import ManifestTexts
from reconciler.runtime.records import RecordCache
from reconciler.runtime.store import Store
from reconciler.spec.loader import LoadedNetwork, LoadedVM, ManifestSet, Source
from reconciler.state import files
from reconciler.state.layout import StateLayout
from reconciler.state.models import AppliedRecord

HOST = "@host"  # the key of bridges and the firewall
GIT_WAIT = 120.0  # a git operation holding index.lock longer than this is taken as a stale lock

log = structlog.get_logger("infinization.sync")


@dataclass(frozen=True)
class DesiredState:
    vms: dict[str, LoadedVM] = field(default_factory=dict)
    networks: dict[str, LoadedNetwork] = field(default_factory=dict)
    invalid: dict[str, list[str]] = field(default_factory=dict)  # VM -> errors while its last good is kept
    revision: str | None = None


def host_records(records: RecordCache, host: str | None, corrupt: dict[str, str]) -> dict[str, AppliedRecord]:
    """This host's VM records; corrupt ones are left out (into ``corrupt``), never fatal to the rest."""
    return {name: rec for name, rec in records.read(corrupt).items() if rec.vm.spec.host == host}


def _changed(new: DesiredState, old: DesiredState) -> set[str]:
    """The keys whose desired state differs: VMs by spec or by being kept invalid; a Network change
    concerns the host and every VM (their NICs may sit on it)."""
    changed = {name for name in set(new.vms) | set(old.vms)
               if (new.vms.get(name) and new.vms[name].vm) != (old.vms.get(name) and old.vms[name].vm)}
    changed |= set(new.invalid) ^ set(old.invalid)
    if {n: net.network for n, net in new.networks.items()} != {n: net.network for n, net in old.networks.items()}:
        changed |= {HOST, *new.vms}
    return changed


class DesiredCache:
    def __init__(self, directory: Path, layout: StateLayout, store: Store, host: str | None) -> None:
        self.directory = directory.resolve()  # a symlinked path is the same source: `cli.common.canonical_dir`
        self.layout = layout
        self.store = store
        self.host = host
        self.state = DesiredState()
        self._loaded = False
        self._last_errors: list[Any] = []
        self._texts = ManifestTexts(self.directory)  # only the files an event names are read again
        self._records = RecordCache(layout)  # only records whose file changed are parsed again
        self._reading = asyncio.Lock()

    def records(self, corrupt: dict[str, str]) -> dict[str, AppliedRecord]:
        return host_records(self._records, self.host, corrupt)

    def forget(self) -> None:
        """The periodic resync: the next read reads every manifest and every record, whatever the events said."""
        self._texts.forget()
        self._records.forget()

    def baseline(self) -> DesiredState:
        """What the cache starts from, before its first read: what was last applied. So a file that is
        broken (or a directory that is empty) when the daemon starts keeps its VMs, exactly as if the daemon
        had seen the file good before."""
        networks = {name: LoadedNetwork(rec.network, Source("", 1))
                    for name, rec in files.read_network_records(self.layout).items()}
        return DesiredState(vms=from_records(self.records({})), networks=networks)

    def _read(self, changed: set[str] | None = None) -> tuple[ManifestSet, str | None]:
        """The file-system part of a reload (bounded, never blocking: ``spec.reading``): only the files in
        ``changed`` when given (``runtime.manifests``). The revision asks git only in a git checkout."""
        manifests = self._texts.read(changed)
        return manifests, revision(self.directory) if git_dir(self.directory) is not None else None

    def load(self) -> set[str]:
        """Re-read the manifests; keep the last good state of anything in a file that fails. Return the keys
        whose desired state changed."""
        return self._update(*self._read())

    def _update(self, manifests: ManifestSet, rev: str | None) -> set[str]:
        old = self.state if self._loaded else self.baseline()
        if not manifests.files and old.vms:
            log.error("the manifest directory holds no manifests; keeping the last good desired state")
            self.store.event("-", "manifest", "error", f"{self.directory} holds no manifests: nothing deleted")
            self.state, self._loaded = old, True
            return set()
        metrics.MANIFEST_ERRORS.set(len(manifests.errors))
        mine = replace(manifests, vms={n: v for n, v in manifests.vms.items() if v.vm.spec.host == self.host})
        desired = keep_last_good(mine, old.vms)
        self._report_errors(manifests)
        self._loaded = True
        self.state = DesiredState(vms=desired.vms, networks=self._networks(manifests, old.networks),
                                  invalid=desired.invalid, revision=rev)
        return _changed(self.state, old)

    @staticmethod
    def _networks(manifests: ManifestSet, old: dict[str, LoadedNetwork]) -> dict[str, LoadedNetwork]:
        failed = manifests.failed_files
        networks = {n: net for n, net in manifests.networks.items() if net.source.file not in failed}
        for name, kept in old.items():  # "": a baseline entry of unknown origin, kept while any file fails
            if name not in networks and (kept.source.file in failed or (not kept.source.file and failed)):
                networks[name] = kept
        return networks

    def _report_errors(self, manifests: ManifestSet) -> None:
        """Log every error each read; put them in the store's events only when they differ from the last."""
        for error in manifests.errors:
            log.warning("manifest error", error=str(error))
        if manifests.errors and manifests.errors != self._last_errors:
            for error in manifests.errors:
                self.store.event("-", "manifest", "error", str(error))
        self._last_errors = manifests.errors

    def reload(self) -> set[str]:
        """``load`` for the watch and resync loops: an unexpected failure is reported and the last good
        state kept; it must never end the loop that keeps the host converged."""
        try:
            return self.load()
        except Exception as exc:
            return self._failed(exc)

    async def reload_async(self, changed: set[str] | None = None) -> set[str]:
        """``reload`` for the daemon: the files are read in a worker thread, so a slow file system (or
        anything a manifest could do to a read) never stalls the event loop that restarts crashed VMs; the
        cache itself is only updated on the loop."""
        async with self._reading:  # one read at a time: an older read must never land after a newer one
            try:
                return self._update(*await asyncio.to_thread(self._read, changed))
            except Exception as exc:
                return self._failed(exc)

    def _failed(self, exc: Exception) -> set[str]:
        # The error itself in the log line (JSON logs render exc_info as just "true").
        message = f"reading the manifests failed: {type(exc).__name__}: {exc}"
        log.error("reading the manifests failed; keeping the last good desired state", error=message)
        self.store.event("-", "manifest", "error", message)
        if not self._loaded:  # never run on an empty desired state: it would read as "delete every VM"
            self.state, self._loaded = self.baseline(), True
        return set()

    async def wait_for_git(self, stopping: asyncio.Event, limit: float = GIT_WAIT) -> None:
        """Act only on a complete tree: while git rewrites the directory (checkout, pull), wait for it."""
        found = git_dir(self.directory)  # a few stats (git itself only for a worktree's .git file)
        if found is None or not (lock := found / "index.lock").exists():
            return
        log.info("a git operation is rewriting the manifests; waiting for it to finish")
        self.store.event("-", "manifest", "waiting", "a git operation is in progress (index.lock): the manifests "
                         "are read once it finishes")
        deadline = time.monotonic() + limit
        while lock.exists():
            if time.monotonic() > deadline:
                log.warning("git's index.lock is still there; reading the manifests anyway", seconds=limit)
                self.store.event("-", "manifest", "error", f"index.lock held for over {limit:g}s: stale? "
                                 "reading the manifests anyway")
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.05)
            if stopping.is_set():
                return
