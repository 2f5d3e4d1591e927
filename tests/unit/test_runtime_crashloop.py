"""Crash-loop history: the pure policy, and its history kept in restarts.json across daemon restarts."""

from __future__ import annotations

from pathlib import Path

from reconciler.plan.actions import Action, Change
from reconciler.plan.steps import Start
from reconciler.runtime.crashloop import CRASH_LIMIT, CRASH_WINDOW, CrashLoops, counts_as_restart, decide
from reconciler.state import files
from reconciler.state.layout import StateLayout


def _start(action: Action) -> Change:
    return Change(name="c", action=action, steps=[Start(name="c", summary="start QEMU")])


def test_the_first_restarts_within_the_limit_run_at_once_and_are_remembered() -> None:
    history: list[float] = []
    for now in (1000.0, 1001.0, 1002.0):
        decision = decide(history, now)
        assert decision.wait is None
        history = decision.history
    assert history == [1000.0, 1001.0, 1002.0]


def test_past_the_limit_within_the_window_the_next_start_waits_and_doubles() -> None:
    history = [1000.0 + i for i in range(CRASH_LIMIT)]
    waiting = decide(history, 1003.0)
    assert waiting.wait == 10 - 1.0, "10 s after the last restart, one second of it gone"
    assert waiting.history == history, "a start that waits is not counted"
    assert decide(history, 1012.5).wait is None, "after the wait the start runs..."
    more = decide(history, 1012.5).history
    assert decide(more, 1013.0).wait == 20 - 0.5, "...and the one after waits twice as long"


def test_restarts_older_than_the_window_are_forgotten() -> None:
    old = [1000.0 + i for i in range(CRASH_LIMIT)]
    decision = decide(old, 1002.0 + CRASH_WINDOW + 1)
    assert decision.wait is None
    assert decision.history == [1002.0 + CRASH_WINDOW + 1]


def test_only_a_start_after_a_failure_counts() -> None:
    assert counts_as_restart(_start(Action.UPDATE), "crash")
    assert counts_as_restart(_start(Action.UPDATE), "guest-panicked")
    assert not counts_as_restart(_start(Action.UPDATE), "guest-shutdown")
    assert not counts_as_restart(_start(Action.UPDATE), "stopped")
    assert counts_as_restart(_start(Action.UPDATE), None), "an end not recorded yet counts as a failure"
    assert not counts_as_restart(_start(Action.CREATE), None), "a first start is not a restart"
    assert not counts_as_restart(Change(name="c", action=Action.UPDATE), "crash"), "no start step"
    assert not counts_as_restart(None, "crash")


def test_the_history_survives_a_new_daemon(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path)
    first = CrashLoops(layout)
    for now in (1000.0, 1001.0, 1002.0):
        assert first.gate("c", now).wait is None
    assert files.read_restarts(layout.vm("c")) == [1000.0, 1001.0, 1002.0]
    restarted = CrashLoops(layout)  # a daemon restarted in the middle of the loop
    assert restarted.gate("c", 1003.0).wait == 9.0
    assert CrashLoops(layout).gate("other", 1003.0).wait is None
