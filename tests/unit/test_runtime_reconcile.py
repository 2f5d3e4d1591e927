"""The reconcile loop without QEMU: real manifests, state folder, planner, executor (record steps) and SQLite
store; only the observer (which would need QEMU, /proc and nft) and, where a QEMU would have to start, the
executor are replaced by small fakes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from reconciler.apply.executor import ApplyResult
from reconciler.plan.actions import Change, Plan
from reconciler.plan.observed import ObservedState, ObservedVM
from reconciler.runtime import reconcile as reconcile_module
from reconciler.runtime.cache import DesiredCache
from reconciler.runtime.listeners import QMPListeners
from reconciler.runtime.queue import Park, WorkQueue
from reconciler.runtime.reconcile import NEEDS_A_PERSON, Reconciler
from reconciler.runtime.status import FAILED
from reconciler.runtime.store import Store
from reconciler.state import files
from reconciler.state.layout import StateLayout
from reconciler.state.models import ExitRecord

HEAD = "apiVersion: infinization.io/v1alpha1\nkind: VirtualMachine\n"


def vm_yaml(name: str, run: str = "Halted") -> str:
    return HEAD + f"metadata: {{name: {name}}}\nspec: {{runStrategy: {run}}}\n"


async def fake_observe(layout: StateLayout, desired: Mapping[str, Any], records: Mapping[str, Any],
                       networks: Mapping[str, Any], only: set[str] | None = None,
                       host: Any = None, facts: Any = None) -> ObservedState:
    """No QEMU runs: each VM is stopped, with how its last QEMU ended as exit.json says."""
    names = (only or set(desired) | set(records))
    vms = {}
    for name in names:
        exit_record = files.read_exit(layout.vm(name))
        vms[name] = ObservedVM(name=name, last_exit=exit_record.reason if exit_record else None)
    return ObservedState(state_dir=str(layout.root), vms=vms)


class Env:
    def __init__(self, tmp: Path) -> None:
        self.manifests = tmp / "manifests"
        self.manifests.mkdir()
        self.layout = StateLayout(tmp / "state")
        self.store = Store(tmp / "state" / "infinization.db")
        self.cache = DesiredCache(self.manifests, self.layout, self.store, host=None)
        self.listeners = QMPListeners(self.layout, self.store, lambda key: None)

    def write(self, name: str, text: str) -> None:
        (self.manifests / f"{name}.yaml").write_text(text)
        self.cache.load()

    def reconciler(self, cls: type[Reconciler] = Reconciler, **kwargs: Any) -> Reconciler:
        return cls(self.cache, self.layout, self.store, self.listeners, **kwargs)

    def conditions(self, vm: str) -> dict[str, str]:
        status = self.store.statuses().get(vm)
        return status.conditions if status else {}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setattr(reconcile_module, "observe", fake_observe)
    environment = Env(tmp_path)
    yield environment
    environment.store.close()


def test_a_new_vm_is_recorded_and_reported_ready(env: Env) -> None:
    env.write("a", vm_yaml("a"))
    assert asyncio.run(env.reconciler()("a")) is None
    assert files.read_record(env.layout.vm("a")) is not None, "the real executor wrote the record"
    assert env.conditions("a") == {"Ready": ""}
    assert env.store.statuses()["a"].phase == "Stopped"


def test_a_corrupt_record_is_reported_and_parked_until_the_record_changes(env: Env) -> None:
    env.write("a", vm_yaml("a"))
    env.layout.vm("a").dir.mkdir(parents=True)
    env.layout.vm("a").record.write_text("{}")
    answer = asyncio.run(env.reconciler()("a"))
    assert isinstance(answer, Park), "a Permanent error is not retried with backoff"
    assert "record" in env.conditions("a")["Failed"]
    assert any(NEEDS_A_PERSON in str(e["message"]) for e in env.store.events("a"))
    assert not answer.changed(), "a resync or an event finds nothing new: it stays parked"
    env.layout.vm("a").record.unlink()  # a person removes the broken record
    assert answer.changed()


def test_a_parked_vm_wakes_when_its_qemu_comes_or_goes(env: Env) -> None:
    env.write("a", vm_yaml("a"))
    paths = env.layout.vm("a")
    paths.run.mkdir(parents=True)  # QEMU's run directory holds its pidfile
    paths.record.write_text("{}")
    answer = asyncio.run(env.reconciler()("a"))
    assert isinstance(answer, Park) and not answer.changed()
    # A process that /proc says is this VM's QEMU (its argv names the pidfile) appears: news to reconcile.
    fake_qemu = subprocess.Popen(["qemu-system-x86_64", "-c", "import time; time.sleep(60)", "-pidfile",
                                  str(paths.pidfile)], executable=sys.executable)
    try:
        paths.pidfile.write_text(f"{fake_qemu.pid}\n")
        assert answer.changed()
    finally:
        fake_qemu.kill()
        fake_qemu.wait()


def test_through_the_queue_a_parked_key_runs_again_once_its_record_is_fixed(env: Env) -> None:
    env.write("a", vm_yaml("a"))
    env.layout.vm("a").dir.mkdir(parents=True)
    env.layout.vm("a").record.write_text("{}")
    reconciler = env.reconciler()
    runs: list[float | Park | None] = []

    async def counted(key: str) -> float | Park | None:
        runs.append(await reconciler(key))
        return runs[-1]

    async def body() -> None:
        queue = WorkQueue(counted)
        runner = asyncio.create_task(queue.run())
        try:
            queue.add("a")
            await _until(lambda: queue.parked() == {"a"})
            queue.add("a")  # a resync
            await asyncio.sleep(0.1)
            assert len(runs) == 1, "parked: no retry, no backoff"
            env.layout.vm("a").record.unlink()
            queue.add("a")  # the next resync sees the record changed
            await _until(lambda: env.conditions("a") == {"Ready": ""})
            assert queue.parked() == set()
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    asyncio.run(body())


class FailingExecutor(Reconciler):
    """Stands in for an executor whose step failed (``permanent``: refused)."""

    permanent = False

    async def _execute(self, changes: list[Change], current: Plan) -> ApplyResult:
        names = {change.name for change in changes}
        return ApplyResult(failed_vms={name: "delete-disk: refused" for name in names},
                           permanent=names if self.permanent else set())


def test_a_refused_step_parks_the_key_and_says_it_needs_a_person(env: Env) -> None:
    env.write("a", vm_yaml("a"))
    reconciler = env.reconciler(FailingExecutor)
    reconciler.permanent = True  # type: ignore[attr-defined]
    assert isinstance(asyncio.run(reconciler("a")), Park)
    assert env.conditions("a")["Failed"] == f"delete-disk: refused ({NEEDS_A_PERSON})"
    assert "Ready" not in env.conditions("a")


def test_a_temporary_failure_backs_off_exponentially(env: Env) -> None:
    env.write("a", vm_yaml("a"))
    reconciler = env.reconciler(FailingExecutor)
    assert [asyncio.run(reconciler("a")) for _ in range(3)] == [1.0, 2.0, 4.0]
    assert env.conditions("a")["Failed"] == FAILED


def test_an_unexpected_error_backs_off_and_is_never_ready(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.write("a", vm_yaml("a"))

    async def broken(*args: Any, **kwargs: Any) -> ObservedState:
        raise RuntimeError("observer bug")

    monkeypatch.setattr(reconcile_module, "observe", broken)
    assert asyncio.run(env.reconciler()("a")) == 1.0
    status = env.store.statuses()["a"]
    assert (status.phase, status.conditions) == ("Unknown", {"Failed": "RuntimeError: observer bug"})


def test_a_crash_looping_vm_waits_before_its_next_start(env: Env) -> None:
    env.write("a", vm_yaml("a", run="Always, disks: [{name: root, size: 1Mi}]"))  # something to boot
    assert asyncio.run(env.reconciler(dry_run=True)("a")) is None  # creates nothing in a dry run...
    files.write_record(env.layout.vm("a"), env.cache.state.vms["a"].vm, None)  # ...so record it as applied
    files.write_exit(env.layout.vm("a"), ExitRecord(reason="crash"))
    now = time.time()
    files.write_restarts(env.layout.vm("a"), [now - 3, now - 2, now - 1])
    delay = asyncio.run(env.reconciler(dry_run=True)("a"))
    assert delay is not None and 8 < delay <= 9
    assert "CrashLoopBackOff" in env.conditions("a")
    assert any(e["kind"] == "crash-loop" for e in env.store.events("a"))
    files.write_restarts(env.layout.vm("a"), [now - 100])  # one old restart: start at once
    assert asyncio.run(env.reconciler(dry_run=True)("a")) is None
    assert len(files.read_restarts(env.layout.vm("a"))) == 2


async def _until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
