"""The published apply document (``apply --json``): valid against its own schema, camelCase, and it says
which steps ran, failed or were skipped, beside the plan that was carried out.

The end-to-end proof that ``executed`` is what really ran on QEMU is tests/e2e/test_apply_equals_plan.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest

from reconciler.plan.apply_document import apply_document, apply_document_schema
from reconciler.plan.document import plan_document
from reconciler.plan.steps import Step
from tests.unit.test_plan_document import CAMEL, _keys
from tests.unit.test_planner_golden import CASES, _case_plan

ROOT = Path(__file__).resolve().parents[2]
STAMP = {"version": "0.0.0-test", "timestamp": "2026-12-01T00:00:00Z"}


@dataclass(frozen=True)
class Outcome:  # the attributes of apply.executor.StepResult
    step: Step
    ok: bool
    detail: str
    seconds: float
    permanent: bool = False
    ran: bool = True


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = apply_document_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_a_run_that_converged(validator: jsonschema.Draft202012Validator) -> None:
    shown = _case_plan(CASES / "create_new_vm")
    after = _case_plan(CASES / "noop_running_in_sync")
    steps = shown.changes[0].steps
    document = apply_document(shown, [Outcome(step, True, "done", 0.0123) for step in steps], {}, set(), after,
                              **STAMP)
    assert [e.message for e in validator.iter_errors(document)] == []
    assert [key for key in _keys(document) if not CAMEL.match(key.rsplit(".", 1)[-1])] == []
    assert list(document)[:3] == ["formatVersion", "infinizationVersion", "timestamp"]
    # The plan inside is exactly what `plan --json` prints for it.
    assert document["plan"] == plan_document(shown, **STAMP)
    executed = [(s["name"], s["kind"], s["target"], s["args"]) for s in document["executed"]]
    assert executed == [(s["name"], s["kind"], s["target"], s["args"])
                        for s in document["plan"]["changes"][0]["steps"]]
    assert {s["result"] for s in document["executed"]} == {"ok"}
    assert document["executed"][0]["durationMs"] == 12.3
    assert (document["ok"], document["failed"]) == (True, [])
    assert document["after"]["converged"] is True and document["after"]["summary"]["steps"] == 0


def test_failed_and_skipped_steps_and_a_run_that_did_not_converge(
        validator: jsonschema.Draft202012Validator) -> None:
    shown = _case_plan(CASES / "create_new_vm")
    first, second, _ = shown.changes[0].steps
    outcomes = [Outcome(first, True, "recorded", 0.001), Outcome(second, False, "qemu-img: no space", 0.2),
                Outcome(first, False, "a bridge change failed", 0.0, ran=False)]
    document = apply_document(shown, outcomes, {"web": "create disk: no space"}, {"web"}, shown, **STAMP)
    assert [e.message for e in validator.iter_errors(document)] == []
    assert [s["result"] for s in document["executed"]] == ["ok", "failed", "skipped"]
    assert document["failed"] == [{"name": "web", "message": "create disk: no space", "permanent": True}]
    assert document["ok"] is False
    assert (document["after"]["converged"], document["after"]["applyable"]) == (False, True)


def test_nothing_ran_has_no_after(validator: jsonschema.Draft202012Validator) -> None:
    document = apply_document(_case_plan(CASES / "noop_running_in_sync"), [], {}, set(), None, **STAMP)
    assert [e.message for e in validator.iter_errors(document)] == []
    assert (document["executed"], document["after"], document["ok"]) == ([], None, True)


def test_the_command_prints_the_published_schema() -> None:
    printed = subprocess.run([sys.executable, "-m", "reconciler", "schema", "apply"], capture_output=True,
                             text=True, check=True, cwd=ROOT).stdout
    assert json.loads(printed) == json.loads((ROOT / "docs" / "schema" / "apply.schema.json").read_text()), (
        "docs/schema/apply.schema.json is stale: python -m reconciler schema apply > docs/schema/apply.schema.json")


def test_apply_json_without_yes_is_refused_before_anything(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    done = subprocess.run([sys.executable, "-m", "reconciler", "apply", str(tmp_path / "m"), "--json",
                           "--state-dir", str(tmp_path / "st")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and done.stdout == ""
    assert "apply --json needs --yes" in done.stderr
    assert not (tmp_path / "st").exists()


def test_apply_json_of_invalid_manifests_is_the_located_diagnostics_document(tmp_path: Path) -> None:
    manifests = tmp_path / "m"
    manifests.mkdir()
    (manifests / "bad.yaml").write_text("apiVersion: infinization.io/v1alpha1\nkind: VirtualMachine\n"
                                        "metadata: {name: bad}\nspec:\n  memory: {size: 99999999999Pi}\n")
    done = subprocess.run([sys.executable, "-m", "reconciler", "apply", str(manifests), "--yes", "--json",
                           "--state-dir", str(tmp_path / "st")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    document = json.loads(done.stdout)
    assert (document["errored"], document["changes"]) == (True, [])
    assert document["diagnostics"][0]["file"].endswith("bad.yaml") and document["diagnostics"][0]["line"] == 5
    assert not (tmp_path / "st").exists()
