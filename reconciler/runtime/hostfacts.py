"""The sync daemon's host-wide facts, kept between the events that change them instead of re-read per reconcile.

A reconcile of one VM used to read the whole host again: every link over netlink and our nftables tables
with two or three ``nft`` processes (most of a reconcile's time on a busy host). ``CachedHostFacts`` (passed
to ``observe.snapshot.observe`` by ``runtime.reconcile``) keeps the links and the firewall state, and reads
them again only when something may have changed them. The rules, so a kept value is never stale:

- ``changed()`` bumps a generation: the netlink watcher (``links_changed``) for every message about a link
  kept here or its addresses (or about an interface of unknown name, or while a read is under way),
  ``NftMonitor`` for every line ``nft monitor`` prints (any table, chain, rule or set change by anyone),
  and the reconciler after any step it ran that can touch links or nftables (its own changes are news too;
  ``runtime.reconcile.LEAVES_HOST_NETWORK`` lists the steps that cannot: a disk grown, a record written).
- A read records the generation it started at; a value is used only while the generation is still that
  one (an event during a read makes the next reconcile read again) and while it is younger than
  ``max_age`` (the resync interval: a missed event costs at most one resync period, like everything else).
- Nothing is kept unless both event sources are subscribed (``watcher_up``): the netlink watcher's socket is
  bound, and ``nft monitor`` has printed a probe table made after it started (so it is known to listen).
  While either is down (failed to start, exited), every reconcile reads the host as before.
- ``forget()`` (the periodic full resync) drops everything: a resync reads the whole host, as before.
- Kept: links and firewall only. What no event announces is read on every call: DHCP servers and leases,
  ip_forward, the QEMU user's uid (``observe.hostnet.with_fresh_parts``), the CPUs, NUMA nodes, hugepage
  pools and cpuset tree (a few small sysfs reads). A bridge's IPv6 autoconf sysctl is part of a link and
  is not announced either: a change to it alone is seen at the next resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from reconciler.observe.hostfacts import HostFacts
from reconciler.observe.hostnet import NFT, observe_links_and_firewall, with_fresh_parts
from reconciler.plan.observed import ObservedHostNetwork

log = structlog.get_logger("infinization.sync")
WATCHERS = frozenset({"netlink", "nft"})  # nothing is kept unless both follow the host
PROBE = "infz-monitor-probe"  # a table made and removed in one transaction: proves `nft monitor` listens


@dataclass(frozen=True)
class _Kept:
    key: tuple[frozenset[str], str]
    generation: int
    read_at: float
    value: ObservedHostNetwork


class CachedHostFacts(HostFacts):
    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self.generation = 0
        self.watchers: set[str] = set()  # the event sources following the host now (WATCHERS when all is well)
        self._kept: _Kept | None = None
        self._reading = 0  # reads under way

    def watcher_up(self, name: str) -> None:
        """Event source ``name`` is subscribed: from now on it reports every change."""
        self.changed()  # what changed before it listened was never reported: read again
        self.watchers.add(name)

    def watcher_down(self, name: str) -> None:
        self.watchers.discard(name)
        self.changed()

    def changed(self) -> None:
        """Something on the host may have changed: the next observation reads it again."""
        self.generation += 1

    def links_changed(self, names: set[str] | None) -> None:
        """Netlink says interfaces ``names`` changed (None: unknown ones): what is kept is dropped if it holds
        one of them, or if a read is under way (it may have read one before the change). Other software's
        interfaces coming and going leave it alone."""
        kept = self._kept
        if names is None or self._reading or kept is None or names & kept.key[0]:
            self.changed()

    def forget(self) -> None:
        self._kept = None

    def _fresh(self, key: tuple[frozenset[str], str]) -> ObservedHostNetwork | None:
        kept = self._kept
        if (kept is None or not self.watchers >= WATCHERS or kept.key != key or kept.generation != self.generation
                or time.monotonic() - kept.read_at > self.max_age):
            return None
        return kept.value

    async def network(self, links: set[str], dhcp: dict[str, tuple[Path, Path]], state_dir: Path,
                      qemu_user: str | None) -> ObservedHostNetwork:
        key = (frozenset(links), str(state_dir))
        value = self._fresh(key)
        if value is None:
            generation, began = self.generation, time.monotonic()
            self._reading += 1
            try:
                value = await observe_links_and_firewall(links, state_dir)
            finally:
                self._reading -= 1
            self._kept = _Kept(key, generation, began, value)
        return with_fresh_parts(value, dhcp, qemu_user)  # small file reads: not worth a thread


class NftMonitor:
    """``nft monitor``: every line it prints is a ruleset change somewhere on the host (``changed``); a line
    naming our ``table`` (a rule of ours deleted, the table flushed away) also calls ``on_ours``: the
    daemon reconciles the firewall at once instead of at the next resync."""

    def __init__(self, facts: CachedHostFacts, table: str, on_ours: Callable[[], object]) -> None:
        self.facts, self.table, self.on_ours = facts, table, on_ours

    async def run(self, stopping: asyncio.Event) -> None:
        """Follow the ruleset until ``stopping``; restarted (after a pause) if it exits meanwhile."""
        warned = False
        while not stopping.is_set():
            try:
                await self._follow()
            except OSError as exc:
                if not warned:  # once: it is retried every few seconds
                    log.warning("cannot follow nftables changes; reading the firewall on every reconcile",
                                error=exc.strerror or str(exc))
                warned = True
            finally:
                self.facts.watcher_down("nft")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 5.0)

    async def _follow(self) -> None:
        process = await asyncio.create_subprocess_exec(
            NFT, "monitor", "ruleset", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        assert process.stdout is not None
        probe = f"{PROBE}-{process.pid}"
        probing = asyncio.create_task(self._probe(probe))
        try:
            while line := await process.stdout.readline():
                self.facts.changed()
                text = line.decode(errors="replace")
                if probe in text and "nft" not in self.facts.watchers:
                    self.facts.watcher_up("nft")
                if self.table in text.split():
                    self.on_ours()
        finally:
            probing.cancel()
            await self._end(process)

    async def _probe(self, name: str) -> None:
        """Make and remove an empty table in one transaction, once a second until ``nft monitor`` prints it:
        then it listens. A change made before that line may not have been seen, so nothing is kept until
        then (``watcher_up`` drops what was)."""
        script = f"add table netdev {name}\ndelete table netdev {name}\n".encode()
        while "nft" not in self.facts.watchers:
            done = await asyncio.create_subprocess_exec(NFT, "-f", "-", stdin=asyncio.subprocess.PIPE,
                                                        stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.DEVNULL)
            await done.communicate(script)
            await asyncio.sleep(1.0)

    @staticmethod
    async def _end(process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(process.wait(), 5.0)
