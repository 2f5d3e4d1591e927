"""The exported JSON Schema accepts every manifest the project ships and rejects broken ones.

An independent validator reads the files as editors and CI linters do: python ``jsonschema`` (draft
2020-12) over ``ruamel.yaml`` (YAML 1.2), not through the project's own loader. The golden planner cases'
manifests are included: between them they use every field.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from ruamel.yaml import YAML

from reconciler.spec.loader import load_text
from reconciler.spec.schema import KINDS, SCHEMA_ID, manifest_schema

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*ROOT.glob("manifests/*.yaml"), *ROOT.glob("examples/*/*.yaml"),
                  *ROOT.glob("tests/unit/plan_cases/*/desired.yaml")])


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in YAML(typ="safe", pure=True).load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = manifest_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_shipped_manifests_exist() -> None:
    assert len(SHIPPED) > 40
    kinds = {doc["kind"] for path in SHIPPED for doc in _documents(path)}
    assert kinds == set(KINDS)  # every kind is exercised


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_manifest_is_valid(validator: jsonschema.Draft202012Validator, path: Path) -> None:
    objects, errors = load_text(path.read_text(), str(path))
    assert not errors  # the loader accepts it (a planner case of deletions has no documents) ...
    assert len(objects) == len(_documents(path))
    for doc in _documents(path):  # ... and so does the schema, read as YAML 1.2
        problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert problems == []


def _demo() -> dict[str, Any]:
    return _documents(ROOT / "manifests" / "demo.yaml")[0]


@pytest.mark.parametrize(("where", "value", "expected"), [
    (("spec", "memory", "size"), "lots", "'lots' is not valid under any of the given schemas"),
    (("spec", "cpu", "cores"), "two", "is not of type 'integer'"),
    (("spec", "machine", "accel"), "xen", "is not valid under any of the given schemas"),
    (("spec", "surprise"), 1, "Additional properties are not allowed"),
    (("kind",), "Pod", "is not one of"),
    (("apiVersion",), "v1", "was expected"),
])
def test_a_broken_manifest_fails(validator: jsonschema.Draft202012Validator, where: tuple[str, ...], value: Any,
                                 expected: str) -> None:
    doc = _demo()
    target = doc
    for key in where[:-1]:
        target = target.setdefault(key, {})
    target[where[-1]] = value
    messages = [e.message for e in validator.iter_errors(doc)]
    assert any(expected in m for m in messages), messages


def test_a_network_is_checked_as_a_network(validator: jsonschema.Draft202012Validator) -> None:
    doc = {"apiVersion": "infinization.io/v1alpha1", "kind": "Network", "metadata": {"name": "lan"},
           "spec": {"bridge": "br-lan", "cores": 2}}
    assert any("'cores' was unexpected" in e.message for e in validator.iter_errors(doc))
    del doc["spec"]["cores"]
    assert list(validator.iter_errors(doc)) == []


def test_accepted_shorthands(validator: jsonschema.Draft202012Validator) -> None:
    doc = _demo()
    doc["spec"]["machine"] = {"accel": "tcg"}
    doc["spec"]["memory"]["size"] = 536870912
    assert list(validator.iter_errors(doc)) == []


def test_the_command_prints_the_published_file() -> None:
    printed = subprocess.run([sys.executable, "-m", "reconciler", "schema"], capture_output=True, text=True,
                             check=True, cwd=ROOT).stdout
    published = (ROOT / "docs" / "schema" / "manifest.schema.json").read_text()
    assert json.loads(printed) == json.loads(published), (
        "docs/schema/manifest.schema.json is stale: python -m reconciler schema > docs/schema/manifest.schema.json")
    assert json.loads(printed)["$id"] == SCHEMA_ID
