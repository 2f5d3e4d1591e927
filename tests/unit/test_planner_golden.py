"""Planner golden cases: desired + observed + last-applied in, rendered plan out.

Each folder under ``plan_cases/`` holds ``desired.yaml`` (manifests), ``observed.yaml`` (an ObservedState),
optionally ``records.yaml`` (last-applied records by VM name) and ``options.yaml``, and ``expected.txt``:
the plan exactly as ``infinization plan`` prints it, followed by its steps as data. Regenerate after an
intended change with ``UPDATE_GOLDEN=1 pytest tests/unit/test_planner_golden.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from rich.text import Text

from reconciler.plan.actions import Plan
from reconciler.plan.observed import AppliedRecord, ObservedState
from reconciler.plan.planner import PlanOptions, plan
from reconciler.plan.render import render_plan
from reconciler.spec.loader import load_text
from reconciler.spec.models import VirtualMachine

CASES = Path(__file__).parent / "plan_cases"


def _case_plan(case: Path) -> Plan:
    objects, errors = load_text((case / "desired.yaml").read_text(), "desired.yaml")
    assert not errors, errors
    desired = {obj.name: obj for obj, _ in objects if isinstance(obj, VirtualMachine)}
    observed = ObservedState.model_validate(yaml.safe_load((case / "observed.yaml").read_text()))
    records_file = case / "records.yaml"
    raw_records = yaml.safe_load(records_file.read_text()) if records_file.exists() else {}
    records = {name: AppliedRecord.model_validate(data) for name, data in (raw_records or {}).items()}
    options_file = case / "options.yaml"
    options = PlanOptions(**yaml.safe_load(options_file.read_text())) if options_file.exists() else PlanOptions()
    return plan(desired, observed, records, manifest_dir="/m", desired_digest="d", options=options)


def _render(result: Plan) -> str:
    text = Text.from_markup(render_plan(result)).plain
    steps = [
        {"vm": step.vm, "kind": step.kind.value, "target": step.target,
         **{k: v for k, v in step.args.items() if k != "vm"}}
        for change in result.changes for step in change.steps
    ]
    return text + "\n--- steps\n" + "\n".join(json.dumps(step, sort_keys=True) for step in steps) + "\n"


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_golden(case: str) -> None:
    folder = CASES / case
    rendered = _render(_case_plan(folder))
    expected_file = folder / "expected.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        expected_file.write_text(rendered)
    assert rendered == expected_file.read_text()


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_deterministic_and_round_trips(case: str) -> None:
    first, second = _case_plan(CASES / case), _case_plan(CASES / case)
    assert first.model_dump_json() == second.model_dump_json()
    assert Plan.model_validate_json(first.model_dump_json()) == first
