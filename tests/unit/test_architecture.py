"""The layers are enforced, and the users' field table in docs/ is the planner's own table."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from reconciler.plan.fields import render_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold() -> None:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 3 kept, 0 broken." in done.stdout


def test_docs_field_table_is_generated_from_the_planner_table() -> None:
    doc = (ROOT / "docs" / "fields.md").read_text()
    assert render_markdown() in doc, "docs/fields.md is stale: run `python -m reconciler.plan.fields > ...`"
