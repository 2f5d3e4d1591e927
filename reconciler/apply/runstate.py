"""Pause and resume a running VM over QMP (``stop`` / ``cont``), for the executor's pause and resume steps.

Each re-checks ``query-status`` right before it acts, so a re-run (or a VM paused or resumed by someone
else since the plan) is a no-op, and checks it again afterwards: the step reports the state QEMU reached,
not the command it sent. A VM that QEMU paused by itself (``io-error``...) is resumed only when the plan
was made for exactly that state (``infinization resume``); otherwise the step is refused.
"""

from __future__ import annotations

from reconciler.adapters.monitor import Monitor
from reconciler.errors import Refused, StepFailed
from reconciler.plan.runstate import PAUSED_BY_QEMU, PAUSED_BY_US, RUNNING, paused_by_qemu


async def status(qmp: Monitor) -> str:
    return str((await qmp.execute("query-status")).get("status", "unknown"))


async def pause(qmp: Monitor) -> str:
    """``stop`` a running VM; one paused already (by us, by hand or by QEMU) is left as it is."""
    now = await status(qmp)
    if now != RUNNING:
        return f"already paused ({now})"
    await qmp.execute("stop")
    after = await status(qmp)
    if after == RUNNING:
        raise StepFailed("QEMU still reports 'running' after stop")
    return f"paused ({after})"


async def resume(qmp: Monitor, from_state: str) -> str:
    """``cont`` a VM we paused (``paused``, or ``prelaunch`` after -S); a VM QEMU paused by itself only when
    the plan asked for exactly that (``from_state``: the operator's ``infinization resume``)."""
    now = await status(qmp)
    if now == RUNNING:
        return "already running"
    if now in PAUSED_BY_QEMU and now != from_state:
        raise Refused(f"the VM was {paused_by_qemu(now)}; not resumed (`infinization resume` once the cause is "
                      "fixed)")
    if now not in PAUSED_BY_US and now not in PAUSED_BY_QEMU:
        raise StepFailed(f"the VM is in state {now!r}: neither paused nor running, not resumed")
    await qmp.execute("cont")
    after = await status(qmp)
    if after != RUNNING:
        raise StepFailed(f"QEMU reports {after!r} after cont" + (
            f": {paused_by_qemu(after)}" if paused_by_qemu(after) else ""))
    return f"resumed (was {now})"
