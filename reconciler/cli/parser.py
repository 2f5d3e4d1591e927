"""The ``infinization`` argument parser: one function per group of subcommands.

Called by ``cli.main``. Each subcommand's ``func`` default names its handler ("module:function" in
``reconciler.cli``), which ``handler`` imports only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from reconciler import __version__

# Not `from typing import TYPE_CHECKING`: importing typing is most of what `--version` would import (mypy and
# ruff read this name the same way). The names below are used in annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn, TypeAlias

# Each subcommand's handler, as "module:function", imported only when that subcommand runs: `--version`
# and `validate` do not pay for the executor, the observers, pyroute2 or the sync daemon.
cmd_plan, cmd_apply = "plan_apply:cmd_plan", "plan_apply:cmd_apply"
cmd_status = "status:cmd_status"
cmd_events, cmd_logs, cmd_schema = "commands:cmd_events", "commands:cmd_logs", "manifests:cmd_schema"
cmd_start_stop, cmd_sync, cmd_validate = "commands:cmd_start_stop", "sync:cmd_sync", "manifests:cmd_validate"
cmd_console, cmd_completion = "display:cmd_console", "commands:cmd_completion"


def handler(name: str) -> Callable[[argparse.Namespace], int]:
    """The handler a subcommand names ("module:function" in ``reconciler.cli``), imported now."""
    module, function = name.split(":")
    found: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(f"reconciler.cli.{module}"),
                                                         function)
    return found

DESCRIPTION = """\
Declarative QEMU virtual machines: the VMs of this host are YAML manifests in a directory (a git checkout).
Infinization compares them with what really runs, shows the plan, and applies it; `sync` keeps the host
converged continuously."""
EPILOG = """\
examples:
  infinization validate manifests/             check the manifests only
  infinization plan manifests/                 what apply would change (a dry run)
  infinization apply manifests/ --yes          do it
  infinization status                          each VM: phase, in sync, pending restarts
  infinization sync manifests/                 keep the host converged (the daemon)
  infinization logs demo --tail 20             a VM's serial console

Every command takes --state-dir and --config; `infinization COMMAND --help` tells more.
Exit codes: 0 success, 1 error (usage errors too), 2 changes present (plan --detailed-exitcode)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 1 like every other error (2 means "changes present" for
    ``plan --detailed-exitcode``, Terraform's convention), and says where to read more."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"error: {message} (see `{self.prog} --help`)\n")


def _sub(sub: _Subparsers, name: str, summary: str, description: str, examples: str,
         parents: list[argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
    """A subcommand with a one-line summary (in the top-level list), a description and examples."""
    # The parents are plain ArgumentParsers (option groups only); typeshed types them as the subclass.
    return sub.add_parser(name, parents=parents or [], help=summary,  # type: ignore[arg-type]
                          description=f"{summary}.\n\n{description}", epilog=f"examples:\n{examples}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


# argparse exposes no public name for it, and it is generic only to type checkers (hence the string).
_Subparsers: TypeAlias = "argparse._SubParsersAction[_Parser]"


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
    p = _sub(sub, "plan", "show what apply would change, without changing anything",
             "Reads the manifests and observes the host (QEMU processes and monitors, disk images, bridges,\n"
             "TAPs, nftables), then prints each resource's action, its changed fields (live, restart or\n"
             "refused, and why) and the ordered steps. Never changes the host and takes no lock. The JSON\n"
             "form is documented in docs/plan-format.md.",
             "  infinization plan manifests/\n"
             "  infinization plan manifests/ --json | jq .summary\n"
             "  infinization plan manifests/ --out tonight.plan && infinization apply tonight.plan\n"
             "  infinization plan manifests/ --detailed-exitcode   # in CI: 0 nothing to do, 2 changes, 1 error",
             [common])
    p.add_argument("directory", help="the manifest directory (*.yaml, *.yml)")
    p.add_argument("--json", action="store_true", help="print the versioned JSON document (docs/plan-format.md)")
    p.add_argument("--out", metavar="FILE", help="also save the plan, for `infinization apply FILE`")
    p.add_argument("--detailed-exitcode", action="store_true", help="exit 0: no changes, 2: changes, 1: error")
    p.add_argument("--allow-restart", action="store_true", help="plan restarts for changes that need one")
    _prune_option(p)
    p.set_defaults(func=cmd_plan)

    p = _sub(sub, "apply", "apply a manifest directory or a saved plan",
             "Shows the plan, asks for confirmation (unless --yes), runs its steps and re-plans to check\n"
             "that the host converged. A saved plan is applied exactly, or refused when the manifests or\n"
             "the host changed since it was saved. Refused while a sync daemon runs on the state directory.",
             "  infinization apply manifests/\n"
             "  infinization apply manifests/ --yes --allow-restart\n"
             "  infinization apply tonight.plan\n"
             "  infinization apply manifests/ --yes --json | jq '.executed[] | [.name, .kind, .result]'",
             [common])
    p.add_argument("target", metavar="DIR|PLANFILE", help="a manifest directory, or a plan saved by `plan --out`")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--allow-restart", action="store_true", help="restart VMs whose changes need it")
    p.add_argument("--allow-empty", action="store_true",
                   help="allow an empty manifest directory to delete every VM")
    p.add_argument("--json", action="store_true", help="print what was done as a versioned JSON document: the plan, "
                   "every step run with its result, the re-plan after (docs/plan-format.md); the plan and "
                   "progress go to stderr. Needs --yes or a saved plan")
    p.add_argument("--jobs", "-j", type=int, default=None,
                   help="how many VMs to change at once (default: $INFINIZATION_APPLY_JOBS or 8 per core)")
    _prune_option(p)
    p.set_defaults(func=cmd_apply)

    p = _sub(sub, "status", "list VMs, their phase and whether they match their manifests",
             "Each VM's phase, PID, whether it matches its manifest, pending restarts, revision, the guest\n"
             "agent's answer, the sync daemon's conditions; Networks with their DHCP leases. Works with a\n"
             "broken manifest (its VMs are shown against their last applied spec).",
             "  infinization status\n"
             "  infinization status manifests/ --json | jq '.vms[] | {name, phase, inSync}'",
             [common])
    p.add_argument("directory", nargs="?", help="manifest directory (default: the one last applied or synced)")
    p.add_argument("--json", action="store_true", help="print JSON (camelCase, with formatVersion)")
    p.set_defaults(func=cmd_status)


def _add_sync_start_stop(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    p = _sub(sub, "sync", "keep the host converged with a manifest directory, continuously (the daemon)",
             "Watches the directory, QEMU's monitors and processes, and the host's links, and reconciles each\n"
             "VM when something changes (and every --resync-interval). Keeps the last good spec of a broken\n"
             "file; backs off on failures; status and events go to SQLite in the state directory. Stop it\n"
             "with SIGTERM: the VMs keep running.",
             "  infinization sync manifests/\n"
             "  infinization sync manifests/ --dry-run\n"
             "  infinization sync /srv/vms --host $(hostname) --metrics-address 127.0.0.1:9464",
             [common])
    p.add_argument("directory", help="the manifest directory to keep the host converged with")
    p.add_argument("--dry-run", action="store_true", help="warn-only: compute and report plans, change nothing")
    p.add_argument("--allow-restart", action="store_true", help="restart VMs whose changes need it")
    p.add_argument("--database", metavar="URL", help="mirror status and events to PostgreSQL (postgresql://...); "
                   "refused with a password in it (argv is public): use --database-file or $INFINIZATION_DATABASE_URL")
    p.add_argument("--database-file", metavar="FILE",
                   help="read the PostgreSQL URL from this file (mode 0600: it holds a password)")
    p.add_argument("--metrics-address", default="127.0.0.1:9464",
                   help="Prometheus metrics HOST:PORT, or 'none' (default 127.0.0.1:9464)")
    p.add_argument("--resync-interval", type=float, default=600.0,
                   help="full resync period, seconds (default 600; events cover the rest; SIGHUP resyncs now)")
    p.add_argument("--debounce-ms", type=int, default=0,
                   help="after a manifest file event, wait this long for more before reading (default 0: a file is "
                   "read once its writer closed it)")
    p.add_argument("--event-retention-days", type=int, default=30, metavar="DAYS",
                   help="prune this host's events older than DAYS, locally and in PostgreSQL (default 30; 0 keeps "
                   "them)")
    _prune_option(p)
    p.set_defaults(func=cmd_sync)

    manual = "for runStrategy Manual"
    for verb, what, why in (("start", "boots it", manual),
                            ("stop", "shuts it down gracefully (guest agent, ACPI, then quit)", manual),
                            ("resume", "QMP cont on a VM QEMU paused by itself (io-error: e.g. its host disk was "
                             "full), once the cause is fixed", "after a disk error")):
        p = _sub(sub, verb, f"{verb} one VM now ({why})",
                 f"{verb.capitalize()}s one VM now: {what}. Never edits manifests.",
                 f"  infinization {verb} web1\n  infinization {verb} web1 --manifests /srv/vms", [common])
        p.add_argument("name", help="the VM's name (metadata.name)")
        p.add_argument("--manifests", dest="directory", help="manifest directory (default: the last applied)")
        p.set_defaults(func=cmd_start_stop)


def _add_read_only(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    p = _sub(sub, "events", "what the sync daemon did, newest last",
             "Each reconcile action of the sync daemon: when, which VM, what, its result and message.",
             "  infinization events\n  infinization events web1 --limit 200 --json", [common])
    p.add_argument("name", nargs="?", help="only this VM's events")
    p.add_argument("--limit", type=int, default=50, help="at most this many events (default 50)")
    p.add_argument("--json", action="store_true", help="print JSON (camelCase, with formatVersion)")
    p.set_defaults(func=cmd_events)

    p = _sub(sub, "logs", "print a VM's serial console log",
             "The guest's serial console as QEMU wrote it to the state directory.",
             "  infinization logs web1\n  infinization logs web1 --tail 50", [common])
    p.add_argument("name", help="the VM's name (metadata.name)")
    p.add_argument("--tail", type=int, default=0, help="only the last N lines")
    p.set_defaults(func=cmd_logs)

    p = _sub(sub, "console", "print a VM's display URL (and open a viewer)",
             "Prints the VNC or SPICE URL of the VM's display (spec.display); on a terminal, opens it with\n"
             "remote-viewer when one is installed. The password is never printed: it is in the file the\n"
             "manifest's passwordFile names.",
             "  infinization console desk1\n  infinization console desk1 --print-only", [common])
    p.add_argument("name", help="the VM's name (metadata.name)")
    p.add_argument("--manifests", dest="directory", help="manifest directory (default: the last applied)")
    p.add_argument("--print-only", action="store_true", help="only print the URL, even on a terminal")
    p.set_defaults(func=cmd_console)

    p = _sub(sub, "validate", "check manifests without touching the host",
             "Loads every manifest strictly and prints every error as file:line:col and field.",
             "  infinization validate manifests/")
    p.add_argument("directory", help="the manifest directory")
    p.set_defaults(func=cmd_validate)

    p = _sub(sub, "schema", "print a JSON Schema: of manifests (every kind), of `plan --json` or of `apply --json`",
             "The manifest schema is for editors (yaml-language-server modeline) and linters; the plan and\n"
             "apply schemas for CI consumers of `plan --json` and `apply --json`. All are published under\n"
             "docs/schema/.",
             "  infinization schema > manifest.schema.json\n  infinization schema plan\n  infinization schema apply")
    p.add_argument("what", nargs="?", choices=("manifest", "plan", "apply"), default="manifest",
                   help="manifest (default): what `validate` reads; plan: what `plan --json` prints; apply: what "
                   "`apply --json` prints")
    p.set_defaults(func=cmd_schema)

    p = _sub(sub, "completion", "print a shell completion script (bash or zsh)",
             "Completes subcommands, options and choices.",
             "  infinization completion bash > /etc/bash_completion.d/infinization\n"
             "  infinization completion zsh > \"${fpath[1]}/_infinization\"")
    p.add_argument("shell", choices=("bash", "zsh"), help="the shell")
    p.set_defaults(func=cmd_completion)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="infinization", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"infinization {__version__}")
    common = _common()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    # Subcommands in the order `--help` lists them.
    _add_plan_apply_status(sub, common)
    _add_sync_start_stop(sub, common)
    _add_read_only(sub, common)
    return parser
