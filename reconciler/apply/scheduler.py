"""When each of a plan's changes runs: host-wide changes one at a time, VMs' changes side by side.

Called by ``apply.executor.Executor.run``, which hands it the plan's changes and a coroutine that runs one
change (its steps in order, stopping at the first failure). The scheduler only decides *when*:

- A plan lists host-wide changes (Networks' bridges, the firewall, DHCP) before the VMs that need them and
  Networks being deleted after the VMs that used them. That order is kept: the changes are cut into
  *waves*, each either one host-wide change or a run of consecutive VM changes, and a wave starts only
  once the one before it has ended.
- Within a wave of VMs, each VM's change runs as one task (its steps stay in order) and up to ``limit`` VMs
  run at once (a semaphore): starting a QEMU is mostly waiting for it, so VMs overlap instead of queueing,
  but a host filling up with 100 VMs does not open 100 QEMU launches, disks and monitors at the same time.
  A change made only of steps that ask and wait (a graceful stop waits for the guest, up to its grace
  period; records, pauses, unlinks) takes no slot: stopping 30 VMs takes the longest shutdown, not a
  number of waves of it.
- Fail-closed: once a host-wide change has failed, no VM change of a later wave runs (a VM started then
  could sit on a bridge without its firewall rules); each is reported as skipped.

A VM's failure never stops another VM (its own later steps depended on it, the others did not).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence

from reconciler.plan.actions import Change
from reconciler.plan.steps import StepKind

JOBS_ENV = "INFINIZATION_APPLY_JOBS"
VM = "VirtualMachine"

# Steps that load the host little: they ask QEMU, the guest or the file system and wait (see the docstring).
WAITING = frozenset({StepKind.WRITE_RECORD, StepKind.STOP, StepKind.STOP_TPM, StepKind.FORGET, StepKind.PAUSE,
                     StepKind.RESUME, StepKind.DELETE_DISK, StepKind.DELETE_TPM_STATE, StepKind.DELETE_EFI_VARS,
                     StepKind.RECORD_DISPLAY_PORT})

RunChange = Callable[[Change], Awaitable[bool]]  # runs one change; True when it went well
Skip = Callable[[Change, str], None]  # reports a change not run, and why


def default_limit() -> int:
    """How many VMs' changes may run at once: ``$INFINIZATION_APPLY_JOBS``, else 8 per core (QEMU
    launches and guest boots mostly wait, on the kernel or on the guest, not on our CPU)."""
    configured = os.environ.get(JOBS_ENV, "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(4, min(64, 8 * (os.cpu_count() or 1)))


def waves(changes: Sequence[Change]) -> list[list[Change]]:
    """The changes cut into waves, in plan order: each host-wide change alone, consecutive VMs together."""
    cut: list[list[Change]] = []
    for change in changes:
        if change.resource == VM and cut and cut[-1][0].resource == VM:
            cut[-1].append(change)
        else:
            cut.append([change])
    return cut


async def run_all(changes: Sequence[Change], run_change: RunChange, skip: Skip, limit: int | None = None) -> None:
    """Run ``changes`` wave by wave (see the module docstring)."""
    gate = asyncio.Semaphore(limit or default_limit())
    host_failed: str | None = None
    for wave in waves(changes):
        if wave[0].resource != VM:
            if not await run_change(wave[0]):
                host_failed = host_failed or f"{wave[0].resource} {wave[0].name}"
            continue
        if host_failed:
            for change in wave:
                skip(change, f"skipped: {host_failed} failed first")
            continue
        await _side_by_side(wave, run_change, gate)


async def _side_by_side(wave: list[Change], run_change: RunChange, gate: asyncio.Semaphore) -> None:
    """Every VM change of the wave, at most the semaphore's count at a time; returns once all have ended.
    A change that raises (a bug, not a failed step: those are results) cancels nothing else, and the first
    such error is raised once the others are done, so no VM is left half-way in the background."""

    async def bounded(change: Change) -> bool:
        if change.steps and all(step.kind in WAITING for step in change.steps):
            return await run_change(change)
        async with gate:
            return await run_change(change)

    outcomes = await asyncio.gather(*(bounded(change) for change in wave), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
