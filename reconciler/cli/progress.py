"""What ``apply``, ``start`` and ``stop`` show while steps run.

Every step that ends prints one line (its VM, summary, result, detail, duration), on a terminal or not, so
logs and CI output stay plain and greppable. On a terminal, the steps still running are also shown below
those lines, each with the seconds it has waited so far (a graceful stop can take a minute, a UEFI boot or
an image copy tens of seconds: the operator sees what is waited on, not a frozen prompt). Steps of several
VMs run at once (``apply.scheduler``), so several can be in flight. Called by ``cli.plan_apply`` and
``cli.commands`` as the executor's ``started`` and ``report`` callbacks.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from reconciler.apply.executor import StepResult
from reconciler.cli.common import print_step
from reconciler.plan.steps import Step


class StepProgress:
    """A context manager: ``started``/``ended`` are the executor's callbacks."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.running: dict[int, tuple[Step, float]] = {}  # id(step) -> (step, when it began)
        self.live = (Live(console=console, transient=True, refresh_per_second=4, get_renderable=self.render)
                     if console.is_terminal else None)

    def __enter__(self) -> StepProgress:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.live is not None:
            self.live.stop()

    def started(self, step: Step) -> None:
        self.running[id(step)] = (step, time.monotonic())

    def ended(self, result: StepResult) -> None:
        self.running.pop(id(result.step), None)
        print_step(result)  # above the live part, which rich redraws below it

    def render(self) -> Group:
        now = time.monotonic()
        return Group(*(Text.from_markup(f"  [cyan]…[/] {escape(step.name)}: {escape(step.summary)} "
                                        f"[dim]({now - began:.0f}s)[/]")
                       for step, began in sorted(self.running.values(), key=lambda item: item[1])))
