"""The status a VM is reported with after a reconcile: a pure function of what the reconcile found.

Called by the reconcile loop (``runtime.reconcile``), which re-observes the VM after acting, re-plans it
and passes the resulting change here; the row goes to the status store (``runtime.store``) that
``infinization status`` reads. Conditions (a type and a message, "" when there is nothing to add):

- ``Ready``: in sync (``Change.in_sync``, the one definition) and the reconcile did not fail.
- ``Drifted``: steps remain after this reconcile (dry run, failure, crash-loop backoff).
- ``RestartRequired``, ``Refused``, ``UnplugPending``: the change's pending causes, refusals, unplugs.
- ``Failed``: the reconcile failed; a failure that needs a person says so in its message.
- ``CrashLoopBackOff``: a restart after failures waits.
- ``ManifestInvalid``: the VM's file fails; its last good spec is kept.
- ``NotPruned``: in no manifest of this directory, but applied from another one: kept, not managed here
  (``--prune-other-sources`` deletes it); the message says where it came from.
- ``PausedByQemu``: QEMU paused the guest itself (io-error: a disk write failed, e.g. the host's disk is full;
  guest-panicked...): it is not resumed by the daemon (``infinization resume NAME`` once fixed).
- ``Unverified``: the pidfile names a live process that is not proven this VM's QEMU (not adopted: the
  VM counts as not running and is started again); the message says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.plan import runstate
from reconciler.plan.actions import Change
from reconciler.plan.observed import ObservedVM
from reconciler.runtime.store import VMStatus

FAILED = "the last reconcile failed (see events)"


@dataclass(frozen=True)
class Outcome:
    """What one reconcile of a VM ended with, besides the change and the VM as observed afterwards."""

    failure: str | None = None  # why it failed (None: it did not)
    backoff: float | None = None  # seconds until a crash-looping VM's next start
    invalid: tuple[str, ...] = ()  # errors of its manifest file, while its last good spec is kept
    revision: str | None = None
    seconds: float = 0.0


def conditions(change: Change | None, outcome: Outcome) -> dict[str, str]:
    found: dict[str, str] = {}
    if change is not None and change.kept:
        return {"NotPruned": change.kept}  # not this directory's: nothing else is true or false of it here
    if (change is None or change.in_sync) and outcome.failure is None:
        found["Ready"] = ""
    if change is not None and change.steps:
        found["Drifted"] = f"{change.action.value}: " + "; ".join(step.summary for step in change.steps)
    if change is not None and change.pending_restart:
        found["RestartRequired"] = "; ".join(change.pending_restart)
    if change is not None and change.refusals:
        found["Refused"] = "; ".join(change.refusals)
    if change is not None and change.unplug_pending:
        found["UnplugPending"] = "; ".join(change.unplug_pending)
    if outcome.failure is not None:
        found["Failed"] = outcome.failure
    if outcome.backoff is not None:
        found["CrashLoopBackOff"] = f"next start in {outcome.backoff:.0f}s"
    if outcome.invalid:
        found["ManifestInvalid"] = "keeping the last good spec: " + "; ".join(outcome.invalid)
    return found


def vm_status(name: str, change: Change | None, vm: ObservedVM, outcome: Outcome, now: float) -> VMStatus:
    """The row for ``name`` after a reconcile that ended at ``now`` (wall clock)."""
    found = conditions(change, outcome)
    if vm.unverified:
        found["Unverified"] = vm.unverified
    if by_qemu := runstate.paused_by_qemu(vm.process.status if vm.process else None):
        found["PausedByQemu"] = by_qemu
    return VMStatus(vm=name, phase=runstate.phase(vm.process.status if vm.process else None),
                    pid=vm.process.pid if vm.process else None, revision=outcome.revision,
                    conditions=found, last_reconcile=now,
                    duration_ms=outcome.seconds * 1000, result="failed" if outcome.failure is not None else "ok")


def gone(desired: bool, change: Change | None, vm: ObservedVM) -> bool:
    """Whether the VM is no longer ours to report: not desired, nothing left to do, no process (and not
    kept from another directory: that is reported, as NotPruned)."""
    return not desired and (change is None or not (change.steps or change.kept)) and vm.process is None


def crashed_status(name: str, error: str, revision: str | None, now: float) -> VMStatus:
    """The row after a reconcile that could not finish (an error before any report): never Ready."""
    return VMStatus(vm=name, phase="Unknown", pid=None, revision=revision, conditions={"Failed": error},
                    last_reconcile=now, duration_ms=0.0, result="failed")
