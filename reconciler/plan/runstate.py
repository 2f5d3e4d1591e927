"""Whether a running VM's vCPUs should run or be paused (``spec.paused``): pure, called by the planner.

QEMU reports its run state (QMP ``query-status``, in ``ObservedProcess.status``). Two of those states are
ours to change: ``paused`` (a ``stop``) and ``prelaunch`` (started with ``-S``: its guest has not run yet),
both left by ``cont``. Others mean QEMU stopped the guest itself: ``io-error`` (a disk read or write failed
and the disk's error policy stopped the guest: typically the host's disk is full), ``guest-panicked``,
``internal-error``, ``watchdog``. Resuming those blindly would repeat the failure (or lose the panic's
evidence), so the plan refuses and says why; ``infinization resume NAME`` is the operator's way to resume
one once the cause is fixed (``PlanOptions.resume``). The remaining states (a migration, a savevm, a guest
suspended to RAM) are left alone. The level-triggered daemon runs the same plan, so a VM paused or resumed
behind its back is put back, as drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reconciler.plan import steps as s
from reconciler.plan.actions import FieldChange, Mode
from reconciler.plan.fields import rule_for

RUNNING = "running"
PAUSED_BY_US = frozenset({"paused", "prelaunch"})
PAUSED_BY_QEMU: dict[str, str] = {
    "io-error": "a disk read or write failed and its error policy stopped the guest (is the host's disk full?)",
    "guest-panicked": "the guest kernel panicked",
    "internal-error": "QEMU hit an internal error (e.g. an emulation failure)",
    "watchdog": "the guest's watchdog fired and its action paused it",
}
UNREACHABLE = "unreachable"


def phase(status: str | None) -> str:
    """The phase a VM is reported in: Stopped (no QEMU), Running, Paused (its vCPUs do not run, whoever
    paused it), or Unknown (its QMP monitor does not answer)."""
    if status is None:
        return "Stopped"
    if status == RUNNING:
        return "Running"
    return "Unknown" if status in (UNREACHABLE, "unknown") else "Paused"


def paused_by_qemu(status: str | None) -> str | None:
    """Why QEMU itself paused the VM (for status and the plan), or None when it did not."""
    if status is None or status not in PAUSED_BY_QEMU:
        return None
    return f"paused by QEMU ({status}): {PAUSED_BY_QEMU[status]}"


@dataclass
class RunPlan:
    steps: list[s.Step] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    fields: list[FieldChange] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)


def _field(before: bool, after: bool) -> FieldChange:
    return FieldChange(path="paused", before=before, after=after, mode=Mode.LIVE, how=rule_for(("paused",)).how)


def plan_run_state(name: str, want_paused: bool, status: str, resume: bool = False) -> RunPlan:
    """The pause or resume step a running QEMU in ``status`` needs so its vCPUs match ``want_paused``.

    ``resume``: the operator asked (``infinization resume``) to resume a VM QEMU paused by itself."""
    found = RunPlan()
    if status == RUNNING and want_paused:
        found.reasons.append("spec.paused is true and the VM is running")
        found.fields.append(_field(False, True))
        found.steps.append(s.Pause(name=name, summary="pause the VM (QMP stop: its vCPUs stop, memory is kept)"))
    elif status in PAUSED_BY_US and not want_paused:
        found.reasons.append("spec.paused is false and the VM is paused" + (
            " (started with -S: its guest has not run yet)" if status == "prelaunch" else ""))
        found.fields.append(_field(True, False))
        found.steps.append(s.Resume(name=name, from_state=status,
                                    summary="resume the VM (QMP cont: the same boot goes on)"))
    elif status in PAUSED_BY_QEMU and resume:
        found.reasons.append(f"resumed by `infinization resume` after it was {paused_by_qemu(status)}")
        found.steps.append(s.Resume(name=name, from_state=status,
                                    summary=f"resume the VM (QMP cont) although QEMU paused it ({status})"))
    elif status in PAUSED_BY_QEMU and not want_paused:
        found.refusals.append(f"the VM was {paused_by_qemu(status)}; it is not resumed: fix the cause, then "
                              f"`infinization resume {name}` (or restart it)")
    return found
