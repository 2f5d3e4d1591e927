"""Typed plan steps: their JSON form (plan format 1, arguments under ``args``) and their order by phase."""

from __future__ import annotations

import json
from typing import get_args

import pytest
from pydantic import TypeAdapter, ValidationError

from reconciler.plan import steps as s

STEP = TypeAdapter(s.Step)


def test_a_step_serialises_with_its_arguments_nested_and_reads_back_as_its_own_type() -> None:
    step = s.GrowDiskLive(name="web", target="root", summary="grow", node="disk-root", size=2048, path="/st/r.qcow2")
    data = json.loads(STEP.dump_json(step))
    assert list(data) == ["kind", "name", "target", "args", "summary"]
    assert data["kind"] == "grow-disk-live"
    assert data["args"] == {"node": "disk-root", "size": 2048, "path": "/st/r.qcow2"}
    back = STEP.validate_python(data)
    assert isinstance(back, s.GrowDiskLive) and back == step


def test_a_step_with_a_wrong_argument_type_is_rejected() -> None:
    with pytest.raises(ValidationError):
        STEP.validate_python({"kind": "add-cpus", "name": "web", "summary": "x", "args": {"count": "many"}})
    with pytest.raises(ValidationError):
        STEP.validate_python({"kind": "no-such-step", "name": "web", "summary": "x", "args": {}})


def test_every_step_kind_has_exactly_one_model() -> None:
    union, _discriminator = get_args(s.Step)  # Annotated[A | B | ..., Field(discriminator="kind")]
    kinds = [model.model_fields["kind"].default for model in get_args(union)]
    assert sorted(kinds) == sorted(s.StepKind)


def test_in_order_sorts_by_phase_and_keeps_the_planned_order_within_a_phase() -> None:
    start = s.Start(name="v", summary="start")
    grow = s.GrowDiskOffline(name="v", target="a", summary="grow a", size=1024, path="/a")
    grow_b = s.GrowDiskOffline(name="v", target="b", summary="grow b", size=1024, path="/b")
    record = s.WriteRecord.model_construct(name="v", target="", summary="record")
    assert s.in_order([start, grow, grow_b, record]) == [record, grow, grow_b, start]
