"""Adding a step kind without an executor handler is a type error, not a surprise at run time.

The executor dispatches on ``plan.steps.Step`` (a discriminated union) with exhaustive ``match`` statements
ending in ``assert_never``. This test type-checks a copy of ``reconciler/`` twice: as it is (it must pass)
and with one more step kind in ``Step`` that no handler knows (mypy must fail in ``apply/executor.py``, at
``assert_never``). About 5 s: both runs share one mypy cache, so the second is incremental.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

NEW_KIND = '''    FROBNICATE = "frobnicate"
'''
NEW_STEP = '''

class Frobnicate(_StepBase):
    """A step kind the planner could emit and no executor handler knows."""

    kind: Literal[StepKind.FROBNICATE] = StepKind.FROBNICATE
    phase = Phase.SETTING


'''
UNION = "Step = Annotated[VMStep | LiveStep | HostStep, Field(discriminator=\"kind\")]"


def _mypy(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "reconciler", "--cache-dir", str(tree / ".mypy_cache")],
                          cwd=tree, capture_output=True, text=True, timeout=300, check=False)


def _add_unhandled_step(steps: Path) -> None:
    text = steps.read_text()
    assert UNION in text, "plan/steps.py no longer defines Step as this test expects: update the test"
    text = text.replace('    STOP_DHCP = "stop-dhcp"\n', '    STOP_DHCP = "stop-dhcp"\n' + NEW_KIND, 1)
    text = text.replace(UNION, NEW_STEP.lstrip("\n") + UNION.replace("HostStep,", "HostStep | Frobnicate,"), 1)
    steps.write_text(text)


def test_a_step_kind_without_a_handler_fails_type_checking(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "reconciler", tmp_path / "reconciler", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")

    clean = _mypy(tmp_path)
    assert clean.returncode == 0, f"the unmodified copy must type-check:\n{clean.stdout}{clean.stderr}"

    _add_unhandled_step(tmp_path / "reconciler" / "plan" / "steps.py")
    broken = _mypy(tmp_path)
    assert broken.returncode == 1, f"mypy accepted a step kind with no handler:\n{broken.stdout}{broken.stderr}"
    errors = [line for line in broken.stdout.splitlines() if ": error:" in line]
    in_executor = [line for line in errors if line.startswith("reconciler/apply/executor.py:")]
    assert in_executor, f"expected an error in apply/executor.py, got:\n{broken.stdout}"
    # mypy names the bottom type "Never" (older versions: "NoReturn").
    assert all("assert_never" in line and "Frobnicate" in line and ('"Never"' in line or '"NoReturn"' in line)
               for line in in_executor), broken.stdout
