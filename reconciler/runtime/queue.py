"""A per-key work queue: coalesced, one run per key at a time, different keys in parallel, with delays.

The sync daemon keys work by VM name (plus ``HOST`` for bridges and the firewall). Many triggers for one
key (a burst of file events, QMP events) collapse into one run; a trigger that arrives while the key is
running schedules exactly one more run after it, so nothing is lost and nothing piles up. The handler
returns None when done, or a delay in seconds after which the key is to run again (backoff). Until then
the key is held: ordinary triggers (events, resyncs; a failing VM's own TAP churn) cannot shorten its
backoff; only an urgent request (its manifest changed: someone may have fixed it) runs it at once.

A handler may also return ``Park(changed)``: the failure needs a person, so no retry is scheduled at all.
The key then sleeps until an urgent request, or until an ordinary trigger finds ``changed()`` true (the
sync daemon: the VM's record file was edited). Other ordinary triggers of a parked key are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Park:
    """A handler's answer "do not retry": hold the key until an urgent request or until ``changed()``."""

    changed: Callable[[], bool]


Handler = Callable[[str], Awaitable[float | Park | None]]


class WorkQueue:
    def __init__(self, handler: Handler, parallel: int = 4) -> None:
        self._handler = handler
        self._parallel = asyncio.Semaphore(parallel)
        self._due: dict[str, float] = {}
        self._running: set[str] = set()
        self._again: set[str] = set()
        self._hold: dict[str, float] = {}  # key -> not before (monotonic), after a run asked for a retry
        self._urgent: set[str] = set()  # running keys that got an urgent request meanwhile
        self._parked: dict[str, Callable[[], bool]] = {}  # key -> "has what it failed on changed?"
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, key: str, delay: float = 0.0, *, urgent: bool = False) -> None:
        """Ask for ``key`` to be reconciled (after ``delay``, and not before its hold unless ``urgent``);
        coalesces with any pending request."""
        if urgent:
            self._hold.pop(key, None)
            self._parked.pop(key, None)
            if key in self._running:
                self._urgent.add(key)
        elif key in self._parked:
            if not self._parked[key]():
                return  # still what it failed on: a resync or an event cannot help
            del self._parked[key]
        if key in self._running and delay == 0:
            self._again.add(key)
            return
        due = max(time.monotonic() + delay, self._hold.get(key, 0.0))
        self._due[key] = min(self._due.get(key, due), due)
        self._wake.set()

    def held(self) -> dict[str, float]:
        """Keys held back after a run asked for a retry, and until when (monotonic seconds)."""
        return dict(self._hold)

    def parked(self) -> set[str]:
        """Keys whose last run failed for good, waiting for a change."""
        return set(self._parked)

    def pending(self) -> dict[str, float]:
        return dict(self._due)

    async def run(self) -> None:
        try:
            while True:
                now = time.monotonic()
                ready = [k for k, due in self._due.items() if due <= now and k not in self._running]
                for key in sorted(ready, key=lambda k: self._due[k]):
                    del self._due[key]
                    self._running.add(key)
                    task = asyncio.create_task(self._work(key))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                waiting = [due for k, due in self._due.items() if k not in self._running]
                timeout = max(0.0, min(waiting) - time.monotonic()) if waiting else None
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _work(self, key: str) -> None:
        retry: float | Park | None = None
        try:
            async with self._parallel:
                retry = await self._handler(key)
        finally:
            self._running.discard(key)
            if isinstance(retry, Park):
                self._park(key, retry)
            else:
                self._after(key, retry)
            self._wake.set()

    def _after(self, key: str, retry: float | None) -> None:
        if retry is None:
            self._hold.pop(key, None)
        elif key not in self._urgent:
            self._hold[key] = time.monotonic() + retry
        self._urgent.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.add(key)
        elif retry is not None:
            self.add(key, retry)

    def _park(self, key: str, park: Park) -> None:
        self._hold.pop(key, None)
        if key in self._urgent:  # its manifest changed while it ran: that may be the fix, run it again
            self._urgent.discard(key)
            self._again.discard(key)
            self.add(key)
            return
        self._parked[key] = park.changed
        if key in self._again:  # an ordinary trigger while it ran counts only if it finds a change
            self._again.discard(key)
            self.add(key)
