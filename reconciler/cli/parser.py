"""The ``infinization`` argument parser: one function per group of subcommands.

Called by ``cli.main``. Each subcommand's ``func`` default is its handler in ``cli.plan_apply``,
``cli.status`` or ``cli.commands``.
"""

from __future__ import annotations

import argparse
from typing import TypeAlias

from reconciler import __version__
from reconciler.cli.commands import (
    cmd_events,
    cmd_logs,
    cmd_schema,
    cmd_start_stop,
    cmd_sync,
    cmd_validate,
)
from reconciler.cli.plan_apply import cmd_apply, cmd_plan
from reconciler.cli.status import cmd_status

DESCRIPTION = "The ``infinization`` command line: plan, apply, status, logs, validate, schema."

# argparse exposes no public name for it, and it is generic only to type checkers (hence the string).
_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _common() -> argparse.ArgumentParser:
    """Options every command that touches a state directory takes (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help="where the reconciler keeps its state "
                        "(default: $INFINIZATION_STATE_DIR or /var/lib/infinization)")
    common.add_argument("--config", help="the host's policy file (default: $INFINIZATION_CONFIG or "
                        "/etc/infinization/config.yaml; without one, built-in defaults)")
    common.add_argument("--lock-timeout", type=float, default=60.0,
                        help="seconds to wait for another run on the same state directory (default 60)")
    common.add_argument("--host", help="this host's name: only VMs whose spec.host names it (default: VMs "
                        "without spec.host)")
    return common


def _prune_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prune-other-sources", action="store_true",
                   help="also delete VMs last applied from another manifest directory (default: they are kept)")


def _add_plan_apply_status(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("plan", parents=[common], help="show what apply would change")
    p.add_argument("directory")
    p.add_argument("--json", action="store_true", help="print the versioned JSON plan")
    p.add_argument("--out", help="save the plan to a file for `apply FILE`")
    p.add_argument("--detailed-exitcode", action="store_true", help="exit 0: no changes, 2: changes, 1: error")
    p.add_argument("--allow-restart", action="store_true", help="plan restarts for changes that need one")
    _prune_option(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", parents=[common], help="apply a manifest directory or a saved plan")
    p.add_argument("target", metavar="DIR|PLANFILE")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--allow-restart", action="store_true", help="restart VMs whose changes need it")
    p.add_argument("--allow-empty", action="store_true",
                   help="allow an empty manifest directory to delete every VM")
    _prune_option(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("status", parents=[common], help="list VMs, their phase and whether they match")
    p.add_argument("directory", nargs="?", help="manifest directory (default: the one last applied)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)


def _add_sync_start_stop(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sync", parents=[common], help="keep the host converged with DIR, continuously")
    p.add_argument("directory")
    p.add_argument("--dry-run", action="store_true", help="warn-only: compute and report plans, change nothing")
    p.add_argument("--allow-restart", action="store_true", help="restart VMs whose changes need it")
    p.add_argument("--database", help="mirror status and events to PostgreSQL (postgresql://...); refused with "
                   "a password in it (argv is public): use --database-file or $INFINIZATION_DATABASE_URL")
    p.add_argument("--database-file", help="read the PostgreSQL URL from this file (mode 0600: it holds a password)")
    p.add_argument("--metrics-address", default="127.0.0.1:9464",
                   help="Prometheus metrics HOST:PORT, or 'none' (default 127.0.0.1:9464)")
    p.add_argument("--resync-interval", type=float, default=30.0, help="full resync period, seconds (default 30)")
    p.add_argument("--debounce-ms", type=int, default=50, help="manifest change debounce (default 50 ms)")
    _prune_option(p)
    p.set_defaults(func=cmd_sync)

    for verb in ("start", "stop"):
        p = sub.add_parser(verb, parents=[common], help=f"{verb} one VM now (for runStrategy Manual)")
        p.add_argument("name")
        p.add_argument("--manifests", dest="directory", help="manifest directory (default: the last applied)")
        p.set_defaults(func=cmd_start_stop)


def _add_read_only(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("events", parents=[common], help="what the sync daemon did, newest last")
    p.add_argument("name", nargs="?")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("logs", parents=[common], help="print a VM's serial console log")
    p.add_argument("name")
    p.add_argument("--tail", type=int, default=0, help="only the last N lines")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("validate", help="check manifests without touching the host")
    p.add_argument("directory")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of the VirtualMachine kind")
    p.set_defaults(func=cmd_schema)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinization", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"infinization {__version__}")
    common = _common()
    sub = parser.add_subparsers(dest="command", required=True)
    # Subcommands in the order `--help` lists them.
    _add_plan_apply_status(sub, common)
    _add_sync_start_stop(sub, common)
    _add_read_only(sub, common)
    return parser
