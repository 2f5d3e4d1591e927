"""Git facts about the manifest directory: its revision ("abc1234" or "abc1234+dirty"), and its git directory
(whose ``index.lock`` says a git operation is rewriting it). Called by the sync daemon; read-only."""

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


def git_dir(directory: Path) -> Path | None:
    """The git directory of the checkout ``directory`` is in, if it is in one.

    Its ``index.lock`` is held while git rewrites the work tree (checkout, pull, merge, reset): a checkout
    writes files in several batches, and acting on a half-written tree could delete a VM whose manifest
    is just moving between files. Asked on every file event, so found without running git when it can
    be: the nearest ``.git`` folder above. Only a ``.git`` file (a worktree, a submodule) asks git where
    its git directory is.
    """
    start = directory.absolute()
    for folder in (start, *start.parents):
        dot = folder / ".git"
        if dot.is_dir():
            return dot
        if dot.exists():
            return _ask_git(directory)
    return None


def _ask_git(directory: Path) -> Path | None:
    try:
        found = subprocess.run(["git", "-C", str(directory), "rev-parse", "--absolute-git-dir"],
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(found.stdout.strip()) if found.returncode == 0 else None
