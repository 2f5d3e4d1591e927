"""QMP listeners without QEMU: the exit tracker on real state folders, and a listener following a real
process (``sleep``) whose monitor socket does not exist: its exit is still seen (pidfd) and recorded."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.runtime.listeners import ExitTracker, QMPListeners
from reconciler.runtime.store import Store
from reconciler.state import files
from reconciler.state.layout import StateLayout
from reconciler.state.models import ExitRecord


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[StateLayout, Store]]:
    layout = StateLayout(tmp_path)
    store = Store(tmp_path / "infinization.db")
    yield layout, store
    store.close()


def _reason(layout: StateLayout, name: str) -> str | None:
    record = files.read_exit(layout.vm(name))
    return record.reason if record else None


def test_a_shutdown_is_recorded_and_the_exit_is_not_a_crash(env: tuple[StateLayout, Store]) -> None:
    layout, store = env
    triggered: list[str] = []
    tracker = ExitTracker("a", 4242, layout.vm("a"), store, triggered.append)
    tracker.handle({"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-shutdown"}})
    assert files.read_exit(layout.vm("a")) == ExitRecord(reason="guest-shutdown", guest=True)
    tracker.exited()
    assert _reason(layout, "a") == "guest-shutdown"
    assert triggered == ["a", "a"]
    assert [e["result"] for e in store.events("a")] == ["info", "info"]


def test_an_exit_without_shutdown_is_a_crash_and_a_panic_is_a_panic(env: tuple[StateLayout, Store]) -> None:
    layout, store = env
    tracker = ExitTracker("a", 4242, layout.vm("a"), store, lambda key: None)
    tracker.handle({"event": "RESUME", "data": {}})
    tracker.exited()
    assert _reason(layout, "a") == "crash"
    assert store.events("a")[-1]["result"] == "failure"
    panicked = ExitTracker("b", 4243, layout.vm("b"), store, lambda key: None)
    panicked.handle({"event": "GUEST_PANICKED", "data": {"action": "pause"}})
    assert _reason(layout, "b") == "guest-panicked"


def test_irrelevant_events_trigger_nothing(env: tuple[StateLayout, Store]) -> None:
    layout, store = env
    triggered: list[str] = []
    ExitTracker("a", 1, layout.vm("a"), store, triggered.append).handle({"event": "RTC_CHANGE", "data": {}})
    assert triggered == [] and store.events("a") == []


def test_a_stop_by_us_is_never_overwritten(env: tuple[StateLayout, Store]) -> None:
    layout, store = env
    files.write_exit(layout.vm("a"), ExitRecord(reason="stopped", how="quit"))
    tracker = ExitTracker("a", 4242, layout.vm("a"), store, lambda key: None)
    tracker.handle({"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-qmp-quit"}})
    tracker.exited()
    assert _reason(layout, "a") == "stopped"


async def _until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_one_listener_per_process_and_its_exit_is_a_crash(env: tuple[StateLayout, Store]) -> None:
    layout, store = env
    triggered: list[str] = []

    async def body() -> None:
        listeners = QMPListeners(layout, store, triggered.append)
        process = subprocess.Popen(["sleep", "30"])
        try:
            listeners.ensure("a", process.pid)
            first = listeners._listeners["a"].task
            listeners.ensure("a", process.pid)  # the same QEMU seen again: the same listener
            assert listeners._listeners["a"].task is first
            process.kill()  # not reaped yet, like a daemonized QEMU that is not our child
            await asyncio.wait_for(first, 10)
            process.wait()
            assert _reason(layout, "a") == "crash"
            assert triggered == ["a"]
            listeners.ensure("a", process.pid)  # finished, but still the same PID: never a second one
            assert listeners._listeners["a"].task is first
        finally:
            process.kill()
            await listeners.close()

    asyncio.run(body())


def test_stopping_a_listener_is_not_an_exit(env: tuple[StateLayout, Store]) -> None:
    layout, store = env
    triggered: list[str] = []

    async def body() -> None:
        listeners = QMPListeners(layout, store, triggered.append)
        process = subprocess.Popen(["sleep", "30"])
        try:
            listeners.ensure("a", process.pid)
            await asyncio.sleep(0.05)
            await asyncio.wait_for(listeners.close(), 10)  # the daemon stops: the VM keeps running
            assert listeners.pid("a") is None
            assert _reason(layout, "a") is None and triggered == []
        finally:
            process.kill()
            process.wait()

    asyncio.run(body())
