"""The CLI's two consoles: ``out`` (stdout) and ``err`` (stderr, every ``error:`` line).

Its own module so that ``cli.main`` can print an error without importing the layers behind the commands
(``common`` re-exports both for the handlers).
"""

from __future__ import annotations

from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
