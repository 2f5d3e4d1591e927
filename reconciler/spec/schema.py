"""The JSON Schema of manifests: one document for every kind, discriminated by ``kind``.

Editors (``yaml-language-server`` through a ``$schema=`` modeline), CI linters (``ajv``, python
``jsonschema``) and platform backends validate manifests with it before the reconciler sees them. It is
generated from the same pydantic models the loader validates with, in *validation* mode, so every scalar
shorthand the loader accepts (``accel: tcg`` for ``[tcg]``, sizes as ``512Mi`` or bytes) is in it. Cross-field
rules (a boot device that names a real disk, a DHCP range inside the subnet...) are the loader's alone: the
schema is a first, local check, never a looser second definition.

Called by ``infinization schema``; ``docs/schema/manifest.schema.json`` is this output, kept in step by a test.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from reconciler.spec.models import API_VERSION, Network, VirtualMachine

SCHEMA_ID = "https://infinization.io/schemas/v1alpha1/manifest.schema.json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"
KINDS: dict[str, type[BaseModel]] = {"VirtualMachine": VirtualMachine, "Network": Network}


def manifest_schema() -> dict[str, Any]:
    """One draft 2020-12 schema for a manifest document of any kind (``if kind == K then K's schema``)."""
    _, defs = models_json_schema([(model, "validation") for model in KINDS.values()],
                                 ref_template="#/$defs/{model}")
    branches = [
        {"if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
         "then": {"$ref": f"#/$defs/{model.__name__}"}}
        for kind, model in KINDS.items()
    ]
    return {
        "$schema": DRAFT,
        "$id": SCHEMA_ID,
        "title": f"Infinization manifest ({API_VERSION})",
        "description": "One YAML document: a VirtualMachine or a Network. Cross-field rules are checked by "
                       "`infinization validate`.",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": API_VERSION},
            "kind": {"enum": list(KINDS)},
        },
        "allOf": branches,
        "$defs": defs.get("$defs", {}),
    }
