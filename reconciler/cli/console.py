"""The CLI's two consoles: ``out`` (stdout) and ``err`` (stderr, every ``error:`` line).

Its own module so that ``cli.main`` can print an error without importing the layers behind the commands
(``common`` re-exports both for the handlers).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def human_output(*, to_stderr: bool) -> Iterator[None]:
    """With ``to_stderr``, what is printed for people on ``out`` goes to stderr for a while: ``apply --json``
    keeps stdout for its document and still shows the plan and its steps as they run."""
    if not to_stderr:
        yield
        return
    previous = out.file
    out.file = sys.stderr
    try:
        yield
    finally:
        out.file = previous
