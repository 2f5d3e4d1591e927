"""The published plan document (``plan --json``): valid against its own schema, camelCase throughout,
round-trips into the same Plan for ``apply PLANFILE``, and its counts, drift and codes say what the plan says.

Every golden planner case is a fixture here, so a new step kind or refusal is covered the day it lands.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from reconciler.plan.actions import Plan
from reconciler.plan.document import (
    PlanFormatError,
    plan_document,
    plan_document_schema,
    plan_from_document,
)
from tests.unit.test_planner_golden import CASES, _case_plan

ROOT = Path(__file__).resolve().parents[2]
ALL = sorted(p.name for p in CASES.iterdir() if p.is_dir())
CAMEL = re.compile(r"^([a-z][a-zA-Z0-9]*|[0-9]+)$")  # numbers: keys of maps by index (vCPU pins)


def _document(case: str) -> tuple[Plan, dict[str, Any]]:
    result = _case_plan(CASES / case)
    return result, plan_document(result, version="0.0.0-test", timestamp="2026-11-30T00:00:00Z")


def _keys(data: Any, where: str = "") -> list[str]:
    """Every key the format itself defines (not inside step arguments' manifests or field values)."""
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            found.append(f"{where}.{key}")
            if key not in ("vm", "before", "after", "network"):  # manifests and values keep their own keys
                found += _keys(value, f"{where}.{key}")
    elif isinstance(data, list):
        for item in data:
            found += _keys(item, where)
    return found


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = plan_document_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("case", ALL)
def test_every_golden_plan_publishes_a_valid_camel_case_document(
        validator: jsonschema.Draft202012Validator, case: str) -> None:
    result, document = _document(case)
    assert [e.message for e in validator.iter_errors(document)] == []
    bad = [key for key in _keys(document) if not CAMEL.match(key.rsplit(".", 1)[-1])]
    assert bad == []
    assert list(document)[:3] == ["formatVersion", "infinizationVersion", "timestamp"]
    # apply PLANFILE reads back exactly the plan that was shown.
    assert plan_from_document(json.loads(json.dumps(document))) == result


def test_counts_flags_and_destructive_steps() -> None:
    _, created = _document("create_new_vm")
    assert created["summary"] == {"create": 1, "update": 0, "restart": 0, "delete": 0, "unchanged": 0,
                                  "pendingRestart": 0, "refused": 0, "drift": 0, "steps": 3, "destructiveSteps": 0}
    assert (created["applyable"], created["errored"], created["complete"]) == (True, False, True)
    assert created["changes"][0]["steps"][1]["args"]["imageFormat"] == "qcow2"

    _, deleted = _document("deleted_manifest_respects_delete_policy_and_ownership")
    destroying = [s for c in deleted["changes"] for s in c["steps"] if s["destroysData"]]
    assert destroying and {s["kind"] for s in destroying} == {"delete-disk"}
    assert deleted["summary"]["destructiveSteps"] == len(destroying)


def test_drift_is_kept_apart_from_manifest_changes() -> None:
    _, drifted = _document("drift_bridge_deleted_and_rule_flushed_are_repaired")
    vm = next(c for c in drifted["changes"] if c["resource"] == "VirtualMachine")
    assert vm["drift"] == ["networks[lan0].tap"]
    # The bridge deleted by hand (no field: the whole Network) drifted too; the firewall's rule diff cannot
    # tell drift from rules new in some VM's manifest, so it is not counted.
    assert drifted["summary"]["drift"] == 2
    _, edited = _document("cpus_and_memory_grow_live")  # the manifest asked for it: not drift
    assert edited["summary"]["drift"] == 0 and all(not c["drift"] for c in edited["changes"])


def test_every_refusal_and_restart_cause_has_a_specific_code() -> None:
    """A new refusal must get a code (plan.document's table) before a CI consumer sees a bare 'refused'."""
    codes: dict[str, set[str]] = {}
    for case in ALL:
        for change in _document(case)[1]["changes"]:
            for reason in [*change["refusals"], *change["pendingRestart"]]:
                codes.setdefault(reason["code"], set()).add(f"{case}: {reason['message']}")
    assert "refused" not in codes and "restart" not in codes, codes.get("refused", codes.get("restart"))
    assert {"refused.disks.size", "refused.hostPolicy", "restart.networks.mac", "restart.cpu.maxCpus"} <= set(codes)


def test_a_plan_errored_and_a_refused_change_are_flagged() -> None:
    _, refused = _document("shrink_is_refused")
    assert (refused["errored"], refused["complete"]) == (True, False)


def test_older_or_foreign_documents_are_refused_clearly() -> None:
    _, document = _document("create_new_vm")
    with pytest.raises(PlanFormatError, match="no formatVersion"):
        plan_from_document({"format_version": 1, "changes": []})
    with pytest.raises(PlanFormatError, match="plan format 3 is not 2"):
        plan_from_document({**document, "formatVersion": 3})
    broken = json.loads(json.dumps(document))
    broken["changes"][0]["steps"][0]["kind"] = "format-the-disk"
    with pytest.raises(PlanFormatError, match="not a valid saved plan"):
        plan_from_document(broken)


def test_invalid_manifests_give_a_document_with_diagnostics(tmp_path: Path,
                                                           validator: jsonschema.Draft202012Validator) -> None:
    manifests = tmp_path / "m"
    manifests.mkdir()
    (manifests / "a.yaml").write_text("apiVersion: infinization.io/v1alpha1\nkind: VirtualMachine\n"
                                      "metadata: {name: a}\nspec:\n  memory: {size: lots}\n")
    done = subprocess.run([sys.executable, "-m", "reconciler", "plan", "--json", "--state-dir", str(tmp_path / "s"),
                           str(manifests)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    document = json.loads(done.stdout)
    assert [e.message for e in validator.iter_errors(document)] == []
    assert (document["errored"], document["applyable"], document["changes"]) == (True, False, [])
    assert document["diagnostics"][0]["line"] == 5 and document["diagnostics"][0]["field"] == "spec.memory.size"


def test_the_command_prints_the_published_schema() -> None:
    printed = subprocess.run([sys.executable, "-m", "reconciler", "schema", "plan"], capture_output=True, text=True,
                             check=True, cwd=ROOT).stdout
    assert json.loads(printed) == json.loads((ROOT / "docs" / "schema" / "plan.schema.json").read_text()), (
        "docs/schema/plan.schema.json is stale: python -m reconciler schema plan > docs/schema/plan.schema.json")


def test_drift_paths_with_numeric_map_keys() -> None:
    """vCPU pins are a map keyed by numbers: the manifest-change paths of such a spec must not crash."""
    from reconciler.plan.planner import _dotted

    assert _dotted(("cpu", "placement", "vcpuPins", 0)) == "cpu.placement.vcpuPins.0"  # type: ignore[arg-type]
