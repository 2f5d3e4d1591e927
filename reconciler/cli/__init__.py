"""The ``infinization`` command line: plan, apply, status, logs, validate, schema.

Entry point of the ``infinization`` console script and of ``python -m reconciler`` (``main``). Wires the
layers together and nothing more: load manifests (spec), observe the host (observe), compute the plan
(plan), render it, and run it (apply). Modules: ``parser`` (argv), ``common`` (consoles, ``CliError``,
``read_view``), ``plan_apply``, ``status`` and ``commands`` (the handlers).

Exit codes: 0 success (``plan --detailed-exitcode``: no changes), 1 error, 2 changes present (with
``--detailed-exitcode``), 130 interrupted. Every error is one ``error:`` line on stderr, never a traceback:
an ``InfinizationError`` (or ``ValueError``) says what to do; anything else is a bug, printed as
``internal error`` (``INFINIZATION_DEBUG=1`` re-raises it for the traceback).
"""

from __future__ import annotations

import gc
import os

from reconciler.cli.parser import build_parser, handler
from reconciler.errors import InfinizationError

TYPE_CHECKING = False  # not typing's: `--version` imports no more than it must (as in cli.parser)
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

__all__ = ["build_parser", "main"]


def _one_line(text: str) -> str:
    """Messages that wrap a library's error (pydantic's are several lines) still print as one line."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _debug() -> bool:
    return os.environ.get("INFINIZATION_DEBUG", "") not in ("", "0")


def _error(prefix: str, exc: BaseException, suffix: str = "") -> None:
    """One ``error:`` line on stderr, any password redacted. The console (rich) and the redactor are
    imported here, not at the top: ``--version`` and ``--help`` never print an error and never pay for them
    (``tests/unit/test_cli_imports.py``)."""
    from rich.markup import escape

    from reconciler.cli.console import err
    from reconciler.runtime.dsn import redact

    err.print(f"[red]error:[/] {prefix}{escape(_one_line(redact(str(exc))))}{suffix}")


def _imported(name: str) -> Callable[[argparse.Namespace], int]:
    """The subcommand's handler, its modules imported with the cyclic garbage collector paused, and what
    they made frozen out of its reach (``gc.freeze``). Importing creates ~45,000 long-lived objects (module
    dicts, pydantic's classes and validators) and no garbage cycles worth collecting: every collection that
    scanned them was wasted (measured on a 2-core EPYC: ~30 ms of the imports, and ~50 ms of a no-op
    ``plan`` with 25 running VMs, whose collections reached the oldest generation; docs/performance.md)."""
    gc.disable()
    try:
        return handler(name)
    finally:
        gc.freeze()
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_imported(args.func)(args))
    except (InfinizationError, ValueError) as exc:
        _error("", exc)
        return 1
    except KeyboardInterrupt:
        from reconciler.cli.console import err

        err.print("interrupted")
        return 130
    except Exception as exc:
        if _debug():
            raise
        _error(f"internal error: {type(exc).__name__}: ", exc, " (set INFINIZATION_DEBUG=1 for the traceback)")
        return 1
