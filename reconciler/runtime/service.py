"""The sync daemon as a systemd service (``Type=notify``): readiness, status line, watchdog, stopping.

Called by ``runtime.daemon``; speaks through ``runtime.sdnotify`` (nothing happens when systemd did not
start us). What each notification means:

- ``READY=1``: the first full pass is over: every key enqueued at start (the host's bridges and firewall,
  every VM of the manifests and every VM with a state folder) has been reconciled once, whatever the
  outcome (a VM that fails is reported Failed and retried; it must not hold the whole service in
  "activating" until systemd gives up). So ``systemctl start`` returns once the host has been converged as
  far as it can be, and a unit ordered ``After=infinization-sync.service`` finds the VMs started.
  While the pass goes on, each reconciled key extends the start timeout (``EXTEND_TIMEOUT_USEC``): a
  long first pass that makes progress is not killed, a stuck one is.
- ``STATUS=``: what ``systemctl status`` shows: VMs by phase, how many are not Ready, the queue.
- ``WATCHDOG=1``: every half ``WatchdogSec=``, from a task of the event loop itself, so a loop that hangs
  (a blocking call in a coroutine, a deadlock) stops the pings and systemd restarts the daemon. A thread
  would go on pinging for a dead loop.
- ``STOPPING=1``: on SIGTERM/SIGINT, before the listeners close; the VMs keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from reconciler.runtime import metrics
from reconciler.runtime.sdnotify import Notifier

EXTEND_START_SECONDS = 120  # after each key of the first pass: time the next one may take (a VM's boot)


class ServiceNotifier:
    def __init__(self, notifier: Notifier, queued: Callable[[], int]) -> None:
        self.notifier = notifier
        self._queued = queued  # keys waiting or held for a retry (the work queue's)
        self._first: set[str] | None = None  # keys of the first pass not reconciled yet; None: not begun
        self._total = 0
        self.ready = False
        self._last_status = ""

    def first_pass(self, keys: Iterable[str]) -> None:
        """The keys enqueued at start: READY=1 once each of them was reconciled once."""
        self._first = set(keys)
        self._total = len(self._first)
        self._status(f"first reconcile: 0 of {self._total} done")
        if not self._first:
            self._ready()

    def reconciled(self, key: str) -> None:
        """One reconcile of ``key`` is over (any outcome)."""
        if not self.ready and self._first is not None and key in self._first:
            self._first.discard(key)
            if not self._first:
                self._ready()
                return
            done = self._total - len(self._first)
            self.notifier.send(extend_timeout_usec=str(EXTEND_START_SECONDS * 1_000_000))
            self._status(f"first reconcile: {done} of {self._total} done")
            return
        if self.ready:
            self._status(self.summary())

    def summary(self) -> str:
        phases, not_ready = metrics.summary()
        vms = sum(phases.values())
        by_phase = ", ".join(f"{count} {phase}" for phase, count in sorted(phases.items()))
        text = f"{vms} VM{'s' if vms != 1 else ''}" + (f" ({by_phase})" if by_phase else "")
        return f"{text}, {not_ready} not Ready, {self._queued()} queued"

    def stopping(self) -> None:
        self.notifier.send(stopping="1", status="stopping; VMs keep running")

    async def watchdog(self, stopping: asyncio.Event) -> None:
        """Ping every half watchdog period until ``stopping``; returns at once when there is no watchdog."""
        if not self.notifier.enabled or self.notifier.watchdog is None:
            return
        period = self.notifier.watchdog / 2
        while not stopping.is_set():
            self.notifier.send(watchdog="1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), period)

    def _ready(self) -> None:
        self.ready = True
        self._last_status = self.summary()
        self.notifier.send(ready="1", status=self._last_status)

    def _status(self, text: str) -> None:
        if text != self._last_status:  # one datagram per change, not per reconcile
            self._last_status = text
            self.notifier.send(status=text)
