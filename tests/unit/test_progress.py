"""The progress display: steps in flight shown with their wait on a terminal, plain lines otherwise."""

from __future__ import annotations

import io

from rich.console import Console

from reconciler.apply.executor import StepResult
from reconciler.cli.progress import StepProgress
from reconciler.plan import steps as s


def _steps() -> tuple[s.Start, s.Stop]:
    return (s.Start(name="web", summary="start QEMU and wait for its monitor"),
            s.Stop(name="db", summary="stop gracefully", timeout=90))


def test_steps_in_flight_are_shown_until_they_end() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    start, stop = _steps()
    progress = StepProgress(console)
    assert progress.live is not None
    progress.started(start)
    progress.started(stop)
    shown = Console(file=io.StringIO(), width=120)
    shown.print(progress.render())
    text = shown.file.getvalue()  # type: ignore[attr-defined]
    assert "web: start QEMU and wait for its monitor (0s)" in text and "db: stop gracefully (0s)" in text
    progress.ended(StepResult(start, True, "started", 1.5))
    assert [step for step, _ in progress.running.values()] == [stop]


def test_no_live_display_off_a_terminal() -> None:
    progress = StepProgress(Console(file=io.StringIO(), force_terminal=False))
    assert progress.live is None
    with progress:
        progress.started(_steps()[0])
