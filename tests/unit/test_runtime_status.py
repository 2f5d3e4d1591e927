"""The status report: conditions are a pure function of the change, the observed VM and the outcome."""

from __future__ import annotations

from reconciler.plan.actions import Action, Change
from reconciler.plan.observed import ObservedProcess, ObservedVM
from reconciler.plan.steps import Start
from reconciler.runtime.status import FAILED, Outcome, conditions, crashed_status, gone, vm_status

SYNCED = Change(name="a", action=Action.NOOP)
RUNNING = ObservedVM(name="a", process=ObservedProcess(pid=42, status="running"))


def test_in_sync_and_not_failed_is_ready_and_nothing_else() -> None:
    assert conditions(SYNCED, Outcome()) == {"Ready": ""}
    assert conditions(None, Outcome()) == {"Ready": ""}


def test_remaining_steps_are_drift_and_not_ready() -> None:
    change = Change(name="a", action=Action.UPDATE, steps=[Start(name="a", summary="start QEMU")])
    assert conditions(change, Outcome()) == {"Drifted": "update: start QEMU"}


def test_pending_restart_refusal_and_unplug_each_have_a_condition_and_none_is_ready() -> None:
    assert conditions(SYNCED.model_copy(update={"pending_restart": ["cpu", "machine"]}), Outcome()) == {
        "RestartRequired": "cpu; machine"}
    assert conditions(SYNCED.model_copy(update={"refusals": ["disk shrinks"]}), Outcome()) == {
        "Refused": "disk shrinks"}
    assert conditions(SYNCED.model_copy(update={"unplug_pending": ["nic1"]}), Outcome()) == {
        "UnplugPending": "nic1"}, "in sync is Change.in_sync: a pending unplug is not Ready"


def test_failure_backoff_and_invalid_manifest() -> None:
    assert conditions(SYNCED, Outcome(failure=FAILED)) == {"Failed": FAILED}
    assert conditions(SYNCED, Outcome(backoff=9.6)) == {"Ready": "", "CrashLoopBackOff": "next start in 10s"}
    assert conditions(SYNCED, Outcome(invalid=("a.yaml:3: bad", "a.yaml:4: worse"))) == {
        "Ready": "", "ManifestInvalid": "keeping the last good spec: a.yaml:3: bad; a.yaml:4: worse"}


def test_the_row() -> None:
    row = vm_status("a", SYNCED, RUNNING, Outcome(revision="abc", seconds=0.25), now=100.0)
    assert (row.vm, row.phase, row.pid, row.revision, row.result) == ("a", "Running", 42, "abc", "ok")
    assert (row.last_reconcile, row.duration_ms) == (100.0, 250.0)
    stopped = vm_status("a", SYNCED, ObservedVM(name="a"), Outcome(failure="x"), now=1.0)
    assert (stopped.phase, stopped.pid, stopped.result) == ("Stopped", None, "failed")
    crashed = crashed_status("a", "CorruptRecord: bad", "abc", 5.0)
    assert (crashed.phase, crashed.conditions, crashed.result) == ("Unknown", {"Failed": "CorruptRecord: bad"},
                                                                   "failed")


def test_a_vm_no_longer_desired_is_forgotten_only_once_nothing_is_left() -> None:
    assert gone(False, None, ObservedVM(name="a"))
    assert not gone(True, None, ObservedVM(name="a"))
    assert not gone(False, None, RUNNING)
    assert not gone(False, Change(name="a", action=Action.DELETE, steps=[Start(name="a", summary="x")]),
                    ObservedVM(name="a"))


def test_an_unverified_process_is_a_condition_and_the_vm_is_not_running() -> None:
    vm = ObservedVM(name="a", unverified="pid 7 in qemu.pid is not adopted: it runs as uid 65534")
    row = vm_status("a", Change(name="a", action=Action.UPDATE, steps=[Start(name="a", summary="start QEMU")]),
                    vm, Outcome(), now=1.0)
    assert row.conditions["Unverified"] == "pid 7 in qemu.pid is not adopted: it runs as uid 65534"
    assert (row.phase, row.pid) == ("Stopped", None)
    assert "Unverified" not in vm_status("a", SYNCED, RUNNING, Outcome(), now=1.0).conditions


def test_a_vm_of_another_directory_is_reported_not_pruned_and_not_ready() -> None:
    kept = SYNCED.model_copy(update={"kept": "applied from /other; not pruned (`--prune-other-sources` deletes it)"})
    assert conditions(kept, Outcome()) == {"NotPruned": kept.kept}
    assert not gone(False, kept, ObservedVM(name="a")), "still reported while it is kept"


def test_a_paused_vm_is_reported_paused_and_one_qemu_paused_itself_says_why() -> None:
    for status in ("paused", "prelaunch", "io-error"):
        vm = ObservedVM(name="a", process=ObservedProcess(pid=42, status=status))
        assert vm_status("a", SYNCED, vm, Outcome(), now=1.0).phase == "Paused", status
    errored = vm_status("a", SYNCED, ObservedVM(name="a", process=ObservedProcess(pid=42, status="io-error")),
                        Outcome(), now=1.0)
    assert "host's disk full" in errored.conditions["PausedByQemu"]
    assert "PausedByQemu" not in vm_status("a", SYNCED, ObservedVM(name="a", process=ObservedProcess(
        pid=42, status="paused")), Outcome(), now=1.0).conditions
    unreachable = ObservedVM(name="a", process=ObservedProcess(pid=42, status="unreachable"))
    assert vm_status("a", SYNCED, unreachable, Outcome(), now=1.0).phase == "Unknown"
