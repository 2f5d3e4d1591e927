"""The sync daemon's work queue: coalescing, one run per key at a time, and backoff that ordinary triggers
cannot shorten (pure asyncio, no host I/O)."""

from __future__ import annotations

import asyncio
import time

from reconciler.runtime.queue import WorkQueue


async def _with_queue(handler, body) -> None:  # type: ignore[no-untyped-def]
    queue = WorkQueue(handler, parallel=2)
    runner = asyncio.create_task(queue.run())
    try:
        await body(queue)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def _until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_triggers_during_a_run_coalesce_into_one_more_run() -> None:
    runs: list[str] = []
    gate = asyncio.Event()

    async def handler(key: str) -> float | None:
        runs.append(key)
        if len(runs) == 1:
            await gate.wait()
        return None

    async def body(queue: WorkQueue) -> None:
        queue.add("a")
        await _until(lambda: runs == ["a"])
        for _ in range(5):
            queue.add("a")  # while "a" runs: one more run, not five
        gate.set()
        await _until(lambda: len(runs) == 2)
        await asyncio.sleep(0.05)
        assert runs == ["a", "a"]

    asyncio.run(_with_queue(handler, body))


def test_a_failing_key_is_held_until_its_retry_and_only_an_urgent_request_skips_that() -> None:
    runs: list[float] = []

    async def handler(key: str) -> float | None:
        runs.append(time.monotonic())
        return 0.5 if len(runs) == 1 else None  # the first run fails: retry in 0.5 s

    async def body(queue: WorkQueue) -> None:
        queue.add("vm")
        await _until(lambda: len(runs) == 1 and "vm" in queue.held())
        for _ in range(3):
            queue.add("vm")  # events and resyncs during the backoff...
        await asyncio.sleep(0.1)
        assert len(runs) == 1, "...do not shorten it"
        await _until(lambda: len(runs) == 2)
        assert runs[1] - runs[0] >= 0.5
        assert queue.held() == {}

    asyncio.run(_with_queue(handler, body))

    runs.clear()

    async def urgent(queue: WorkQueue) -> None:
        queue.add("vm")
        await _until(lambda: len(runs) == 1 and "vm" in queue.held())
        queue.add("vm", urgent=True)  # the manifest changed: maybe fixed, try now
        await _until(lambda: len(runs) == 2, timeout=0.4)

    asyncio.run(_with_queue(handler, urgent))


def test_a_parked_key_sleeps_until_what_it_failed_on_changes_or_an_urgent_request() -> None:
    from reconciler.runtime.queue import Park

    runs: list[str] = []
    fixed = {"record": False}

    async def handler(key: str) -> float | Park | None:
        runs.append(key)
        if len(runs) == 1:
            return Park(lambda: fixed["record"])  # failed for good: do not retry
        return None

    async def body(queue: WorkQueue) -> None:
        queue.add("vm")
        await _until(lambda: queue.parked() == {"vm"})
        assert queue.held() == {} and queue.pending() == {}, "no retry is scheduled"
        for _ in range(3):
            queue.add("vm")  # resyncs and events while nothing changed...
        await asyncio.sleep(0.1)
        assert runs == ["vm"], "...are dropped"
        fixed["record"] = True  # a person edits the record: the next ordinary trigger runs it
        queue.add("vm")
        await _until(lambda: len(runs) == 2)
        assert queue.parked() == set()

    asyncio.run(_with_queue(handler, body))

    runs.clear()
    fixed["record"] = False

    async def urgent(queue: WorkQueue) -> None:
        queue.add("vm")
        await _until(lambda: queue.parked() == {"vm"})
        queue.add("vm", urgent=True)  # its manifest changed
        await _until(lambda: len(runs) == 2)
        assert queue.parked() == set()

    asyncio.run(_with_queue(handler, urgent))


def test_an_urgent_request_during_a_run_that_parks_runs_it_again() -> None:
    from reconciler.runtime.queue import Park

    runs: list[str] = []
    gate = asyncio.Event()

    async def handler(key: str) -> float | Park | None:
        runs.append(key)
        if len(runs) == 1:
            await gate.wait()
            return Park(lambda: False)
        return None

    async def body(queue: WorkQueue) -> None:
        queue.add("vm")
        await _until(lambda: runs == ["vm"])
        queue.add("vm", urgent=True)  # the manifest changed while the failing run was still going
        gate.set()
        await _until(lambda: len(runs) == 2)
        assert queue.parked() == set()

    asyncio.run(_with_queue(handler, body))
