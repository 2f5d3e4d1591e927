"""Git facts about the manifest directory: its revision ("abc1234" or "abc1234+dirty"), and whether a git
operation is rewriting it right now. Called by the sync daemon; read-only."""

from __future__ import annotations

import subprocess
from pathlib import Path


def revision(directory: Path) -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(directory), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(directory), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def operation_in_progress(directory: Path) -> bool:
    """True while git is rewriting the work tree (``index.lock`` held: checkout, pull, merge, reset).

    A checkout writes files in several batches; acting on a half-written tree could delete a VM whose
    manifest is just moving between files.
    """
    try:
        found = subprocess.run(["git", "-C", str(directory), "rev-parse", "--absolute-git-dir"],
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return found.returncode == 0 and (Path(found.stdout.strip()) / "index.lock").exists()
