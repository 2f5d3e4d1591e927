"""spec.paused against QEMU's run state (plan.runstate): which step, reason, drift field or refusal (pure)."""

from __future__ import annotations

import pytest

from reconciler.plan import runstate
from reconciler.plan import steps as s


@pytest.mark.parametrize(("want", "status", "kind"), [
    (True, "running", s.Pause), (False, "paused", s.Resume), (False, "prelaunch", s.Resume),
])
def test_a_vm_we_can_pause_or_resume_gets_exactly_one_step(want: bool, status: str, kind: type) -> None:
    found = runstate.plan_run_state("web", want, status)
    assert [type(step) for step in found.steps] == [kind]
    assert [(f.path, f.before, f.after) for f in found.fields] == [("paused", not want, want)]
    assert not found.refusals


@pytest.mark.parametrize(("want", "status"), [
    (True, "paused"), (True, "prelaunch"), (False, "running"), (True, "io-error"), (False, "suspended"),
    (True, "inmigrate"), (False, "unreachable"), (True, "unreachable"),
])
def test_nothing_to_do_when_it_matches_or_the_state_is_not_ours(want: bool, status: str) -> None:
    found = runstate.plan_run_state("web", want, status)
    assert (found.steps, found.refusals, found.fields) == ([], [], [])


@pytest.mark.parametrize("status", sorted(runstate.PAUSED_BY_QEMU))
def test_a_vm_qemu_paused_itself_is_refused_not_resumed_unless_the_operator_asks(status: str) -> None:
    refused = runstate.plan_run_state("web", False, status)
    assert refused.steps == [] and len(refused.refusals) == 1
    assert f"paused by QEMU ({status})" in refused.refusals[0] and "infinization resume web" in refused.refusals[0]
    asked = runstate.plan_run_state("web", False, status, resume=True)
    assert [(type(step), step.from_state) for step in asked.steps if isinstance(step, s.Resume)] == [
        (s.Resume, status)]
    assert not asked.refusals


def test_phases() -> None:
    assert [runstate.phase(x) for x in (None, "running", "paused", "prelaunch", "io-error", "unreachable")] == [
        "Stopped", "Running", "Paused", "Paused", "Paused", "Unknown"]


def test_resume_runs_first_and_pause_last_among_a_vms_steps() -> None:
    pause, resume = s.Pause(name="a", summary="p"), s.Resume(name="a", summary="r")
    plug = s.SetLink(name="a", target="nat", summary="l", up=True)
    assert s.in_order([pause, plug, resume]) == [resume, plug, pause]


@pytest.mark.parametrize("value", ['"true"', "1", "yes", "on"])
def test_spec_paused_is_a_strict_boolean_located_in_its_file(value: str) -> None:
    from reconciler.spec.loader import load_text

    manifest = ("apiVersion: infinization.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: web\nspec:\n"
                f"  paused: {value}\n")
    objects, errors = load_text(manifest, "web.yaml")
    assert not objects and len(errors) == 1
    assert str(errors[0]).startswith("web.yaml:6:11: spec.paused: Input should be a valid boolean")
