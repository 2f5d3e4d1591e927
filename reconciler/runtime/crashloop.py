"""Crash-loop history: restarts after failures are rate-limited, and the history outlives the daemon.

Called by the reconcile loop (``runtime.reconcile``) before it runs a change that starts a VM. The policy
is ``decide``, a pure function of the restart history and the clock: past ``CRASH_LIMIT`` restarts within
``CRASH_WINDOW`` seconds, the next start waits (10 s, doubling per further restart, at most 300 s).
``CrashLoops`` keeps each VM's history in memory and in ``vms/NAME/restarts.json`` (through
``state.files``) on the wall clock, so a daemon restarted in the middle of a crash loop keeps backing off.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from reconciler.plan.actions import Action, Change
from reconciler.plan.steps import StepKind
from reconciler.state import files
from reconciler.state.layout import StateLayout
from reconciler.state.models import FAILURES

CRASH_WINDOW = 120.0
CRASH_LIMIT = 3


@dataclass(frozen=True)
class Decision:
    """``wait`` seconds before the start may run (None: start now); ``history``: the restarts to keep."""

    wait: float | None
    history: list[float]


def counts_as_restart(change: Change | None, last_exit: str | None) -> bool:
    """Whether ``change`` starts a VM again after a failure (the only starts the policy limits)."""
    if change is None or not any(step.kind is StepKind.START for step in change.steps):
        return False
    # A reconcile can run before the exit listener has written exit.json (a resync, an event of the
    # dying QEMU): an unknown end of a VM we already ran counts as a failure here.
    unknown = last_exit is None and change.action is not Action.CREATE
    return last_exit in FAILURES or unknown


def decide(history: Sequence[float], now: float) -> Decision:
    """Start now (and remember it), or wait: past the limit within the window, back off exponentially."""
    recent = [t for t in history if 0 <= now - t < CRASH_WINDOW]
    if len(recent) >= CRASH_LIMIT:
        delay = float(min(300, 10 * 2 ** (len(recent) - CRASH_LIMIT)))
        if now - recent[-1] < delay:
            return Decision(wait=delay - (now - recent[-1]), history=recent)
    return Decision(wait=None, history=[*recent, now])


class CrashLoops:
    """Each VM's restarts after failures, newest last; read from its folder the first time it is needed."""

    def __init__(self, layout: StateLayout) -> None:
        self.layout = layout
        self._history: dict[str, list[float]] = {}

    def history(self, name: str) -> list[float]:
        if name not in self._history:
            self._history[name] = files.read_restarts(self.layout.vm(name))
        return self._history[name]

    def gate(self, name: str, now: float | None = None) -> Decision:
        """Ask to restart ``name`` after a failure: a start allowed now is recorded (memory and disk)."""
        decision = decide(self.history(name), time.time() if now is None else now)  # wall clock: see above
        if decision.wait is None:
            self._history[name] = decision.history
            with contextlib.suppress(OSError):  # the limit still holds for this daemon's lifetime
                files.write_restarts(self.layout.vm(name), decision.history)
        return decision
