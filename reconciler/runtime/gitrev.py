"""The git revision of the manifest directory, if it is a git checkout ("abc1234" or "abc1234+dirty")."""

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
