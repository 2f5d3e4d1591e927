"""apply.scheduler: host-wide changes in plan order and fail-closed, VMs side by side within a bound.

The scheduler only orders coroutines it is given; these tests give it ones that record what ran when
(events, never timings).
"""

from __future__ import annotations

import asyncio

from reconciler.apply import scheduler
from reconciler.plan import steps as s
from reconciler.plan.actions import Action, Change


def _change(name: str, resource: str = "VirtualMachine") -> Change:
    return Change(resource=resource, name=name, action=Action.CREATE)  # type: ignore[arg-type]


PLAN = [_change("net", "Network"), _change("fw", "Firewall"), _change("a"), _change("b"), _change("c"),
        _change("old", "Network")]


class Recorder:
    def __init__(self, failing: set[str] = frozenset(), hold: set[str] = frozenset()) -> None:
        self.failing, self.hold = failing, hold
        self.log: list[str] = []
        self.skipped: dict[str, str] = {}
        self.running = 0
        self.most = 0
        self.release = asyncio.Event()

    async def run(self, change: Change) -> bool:
        self.log.append(f"begin {change.name}")
        self.running += 1
        self.most = max(self.most, self.running)
        if change.name in self.hold:
            await self.release.wait()
        else:
            await asyncio.sleep(0)
        self.running -= 1
        self.log.append(f"end {change.name}")
        return change.name not in self.failing

    def skip(self, change: Change, why: str) -> None:
        self.skipped[change.name] = why


def test_waves_keep_host_changes_alone_and_vms_together() -> None:
    assert [[c.name for c in wave] for wave in scheduler.waves(PLAN)] == [["net"], ["fw"], ["a", "b", "c"], ["old"]]


def test_vms_run_side_by_side_between_the_host_changes() -> None:
    recorder = Recorder()
    asyncio.run(scheduler.run_all(PLAN, recorder.run, recorder.skip, limit=8))
    log = recorder.log
    assert log[:4] == ["begin net", "end net", "begin fw", "end fw"]
    assert log[4:7] == ["begin a", "begin b", "begin c"]  # all three began before any ended
    assert log[-2:] == ["begin old", "end old"]  # the Network's deletion waits for every VM
    assert recorder.most == 3


def test_the_bound_holds() -> None:
    changes = [_change(f"vm{i}") for i in range(10)]
    recorder = Recorder()
    asyncio.run(scheduler.run_all(changes, recorder.run, recorder.skip, limit=3))
    assert recorder.most == 3
    assert sorted(line for line in recorder.log if line.startswith("end")) == sorted(f"end vm{i}" for i in range(10))


def test_changes_that_only_wait_take_no_slot() -> None:
    """Graceful stops wait for their guests: 10 of them run at once under a bound of 3; starts keep it."""
    stops = [Change(resource="VirtualMachine", name=f"h{i}", action=Action.UPDATE,  # type: ignore[arg-type]
                    steps=[s.Stop(name=f"h{i}", summary="stop", timeout=60)]) for i in range(10)]
    starts = [Change(resource="VirtualMachine", name=f"s{i}", action=Action.CREATE,  # type: ignore[arg-type]
                     steps=[s.Start(name=f"s{i}", summary="start")]) for i in range(10)]
    recorder = Recorder(hold={c.name for c in stops})

    async def scenario() -> None:
        run = asyncio.ensure_future(scheduler.run_all(stops, recorder.run, recorder.skip, limit=3))
        async def all_waiting() -> None:
            while recorder.running < 10:
                await asyncio.sleep(0)
        await asyncio.wait_for(all_waiting(), 10)  # every stop is waiting at once (the bound: a guard)
        recorder.release.set()
        await run
    asyncio.run(scenario())
    assert recorder.most == 10
    bounded = Recorder()
    asyncio.run(scheduler.run_all(starts, bounded.run, bounded.skip, limit=3))
    assert bounded.most == 3


def test_a_failed_host_change_skips_every_vm_after_it_but_not_host_changes() -> None:
    recorder = Recorder(failing={"fw"})
    asyncio.run(scheduler.run_all(PLAN, recorder.run, recorder.skip, limit=8))
    assert not any(name in line for line in recorder.log for name in ("begin a", "begin b", "begin c"))
    assert set(recorder.skipped) == {"a", "b", "c"}
    assert all("Firewall fw failed first" in why for why in recorder.skipped.values())
    assert recorder.log[-2:] == ["begin old", "end old"]


def test_a_failed_vm_stops_nothing_else() -> None:
    recorder = Recorder(failing={"a"})
    asyncio.run(scheduler.run_all(PLAN, recorder.run, recorder.skip, limit=8))
    assert {"end b", "end c", "end old"} <= set(recorder.log)
    assert recorder.skipped == {}


def test_a_slow_vm_holds_back_only_the_next_wave() -> None:
    async def scenario() -> Recorder:
        recorder = Recorder(hold={"a"})
        run = asyncio.ensure_future(scheduler.run_all(PLAN, recorder.run, recorder.skip, limit=8))
        async def others_done() -> None:
            while "end c" not in recorder.log:
                await asyncio.sleep(0)
        await asyncio.wait_for(others_done(), 10)  # a guard against a hang, not a timing
        assert "begin old" not in recorder.log  # still waiting for a
        recorder.release.set()
        await run
        return recorder
    recorder = asyncio.run(scenario())
    assert recorder.log.index("end a") < recorder.log.index("begin old")


def test_the_limit_comes_from_the_environment(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(scheduler.JOBS_ENV, "5")
    assert scheduler.default_limit() == 5
    monkeypatch.setenv(scheduler.JOBS_ENV, "zero")
    assert scheduler.default_limit() >= 4
