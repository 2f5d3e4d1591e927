"""The ``infinization`` command line: plan, apply, status, logs, validate, schema.

Wires the layers together and nothing more: load manifests (spec), observe the host (observe), compute the
plan (plan), render it, and run it (apply). Exit codes: 0 success (``plan --detailed-exitcode``: no
changes), 1 error, 2 changes present (with ``--detailed-exitcode``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from reconciler import __version__
from reconciler.apply.executor import Executor, StepResult
from reconciler.apply.lock import StateLock
from reconciler.errors import CorruptRecord, LockTimeout
from reconciler.observe.snapshot import observe
from reconciler.plan.actions import FORMAT_VERSION, Action, Plan
from reconciler.plan.observed import ObservedState
from reconciler.plan.planner import PlanOptions, plan
from reconciler.plan.render import render_plan, summary_line
from reconciler.plan.steps import StepKind
from reconciler.runtime.daemon import Options, run_daemon
from reconciler.runtime.gitrev import revision
from reconciler.runtime.store import VMStatus, conditions_text, open_readonly
from reconciler.spec.loader import LoadedVM, ManifestSet, Source, load_directory
from reconciler.spec.models import VirtualMachine
from reconciler.state import files
from reconciler.state.files import write_atomic
from reconciler.state.layout import StateLayout, state_dir_from_env
from reconciler.state.models import AppliedRecord

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class CliError(Exception):
    """An error to print as one clear message and exit 1."""


@dataclass
class Snapshot:
    manifests: ManifestSet
    records: dict[str, AppliedRecord]
    observed: ObservedState
    plan: Plan


def _layout(args: argparse.Namespace) -> StateLayout:
    return StateLayout(state_dir_from_env(args.state_dir))


def _load(directory: str) -> ManifestSet:
    manifests = load_directory(directory)
    if manifests.errors:
        for error in manifests.errors:
            err.print(f"[red]error:[/] {escape(str(error))}")
        count = len(manifests.errors)
        raise CliError(f"{count} error{'s' if count > 1 else ''} in the manifests; nothing was changed")
    return manifests


async def _snapshot(directory: str, layout: StateLayout, allow_restart: bool, host: str | None = None,
                    options: PlanOptions | None = None, tolerate_errors: bool = False) -> Snapshot:
    if tolerate_errors:
        manifests = load_directory(directory)
        for error in manifests.errors:
            err.print(f"[yellow]warning:[/] {escape(str(error))}")
        if manifests.errors:
            # Status must still work with a broken file: show its VMs against their last applied spec.
            records = files.read_records(layout)
            failed = {str(Path(file).absolute()) for file in manifests.failed_files}
            for name, record in records.items():
                if name not in manifests.vms and (not record.source or str(Path(record.source).absolute()) in failed):
                    manifests.vms[name] = LoadedVM(record.vm, Source(record.source or "?", 0))
    else:
        manifests = _load(directory)
    # A VM belongs to the host its spec names (none: hosts run without --host).
    desired = {name: loaded.vm for name, loaded in manifests.vms.items() if loaded.vm.spec.host == host}
    try:
        records = {n: r for n, r in files.read_records(layout).items() if r.vm.spec.host == host}
    except CorruptRecord as exc:
        raise CliError(f"corrupt state record, fix or remove it by hand: {exc}") from exc
    networks = {name: loaded.network for name, loaded in manifests.networks.items()}
    observed = await observe(layout, desired, records, networks)
    result = plan(desired, observed, records, networks=networks, manifest_dir=str(Path(directory).absolute()),
                  desired_digest=manifests.digest(),
                  options=options or PlanOptions(allow_restart=allow_restart))
    return Snapshot(manifests, records, observed, result)


# -- plan -------------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    layout = _layout(args)
    # Reading needs no lock: plan and status work while apply or the sync daemon runs.
    snap = asyncio.run(_snapshot(args.directory, layout, args.allow_restart, args.host))
    if args.out:
        write_atomic(Path(args.out), snap.plan.model_dump_json(indent=2) + "\n")
    if args.json:
        print(snap.plan.model_dump_json(indent=2))
    else:
        out.print(render_plan(snap.plan), end="")
        if args.out:
            out.print(f"\nSaved the plan to {args.out}. Run `infinization apply {args.out}` to apply exactly it.")
    if snap.plan.refused:
        return 1
    if args.detailed_exitcode and not snap.plan.empty:
        return 2
    return 0


# -- apply ------------------------------------------------------------------------------------------


def _print_step(result: StepResult) -> None:
    mark = "[green]ok[/]" if result.ok else "[red]FAILED[/]"
    out.print(f"  {result.step.name}: {escape(result.step.summary)} ... {mark} [dim]({escape(result.detail)}, "
              f"{result.seconds * 1000:.0f} ms)[/]")


def _confirm(args: argparse.Namespace) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise CliError("refusing to apply without confirmation: stdin is not a terminal (use --yes)")
    answer = out.input("\nDo you want to perform these actions? Only 'yes' will be accepted: ")
    return answer.strip() == "yes"


def _read_saved_plan(path: Path) -> Plan:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read saved plan {path}: {exc}") from exc
    if data.get("format_version") != FORMAT_VERSION:
        raise CliError(f"{path}: plan format {data.get('format_version')!r} is not {FORMAT_VERSION}")
    return Plan.model_validate(data)


def cmd_apply(args: argparse.Namespace) -> int:
    layout = _layout(args)
    target = Path(args.target)
    saved = None if target.is_dir() else _read_saved_plan(target)
    directory = saved.manifest_dir if saved else args.target
    allow_restart = saved.allow_restart if saved else args.allow_restart
    _refuse_if_daemon_runs(layout)
    with StateLock(layout.lock, exclusive=True, wait=args.lock_timeout):
        snap = asyncio.run(_snapshot(directory, layout, allow_restart, args.host))
        _refuse_empty_directory(snap, args.allow_empty)
        if saved is not None:
            _check_fresh(saved, snap.plan, layout)
        out.print(render_plan(snap.plan), end="")
        if not any(change.steps for change in snap.plan.changes):
            return 1 if snap.plan.refused else 0
        if saved is None and not _confirm(args):
            out.print("Apply cancelled.")
            return 1
        out.print("")
        files.write_source(layout, snap.plan.manifest_dir)
        # Absolute: the sync daemon, started elsewhere, matches a record's file against the broken ones.
        sources = {name: str(Path(loaded.source.file).absolute()) for name, loaded in snap.manifests.vms.items()}
        rev = revision(Path(snap.plan.manifest_dir))
        result = asyncio.run(Executor(layout, _print_step, sources, revision=rev).run(snap.plan))
        after = asyncio.run(_snapshot(directory, layout, allow_restart, args.host))
    counts = snap.plan.counts()
    done = ", ".join(f"{counts[a]} {verb}" for a, verb in (
        (Action.CREATE, "created"), (Action.UPDATE, "updated"), (Action.RESTART, "restarted"),
        (Action.DELETE, "deleted")))
    for vm, why in result.failed_vms.items():
        err.print(f"[red]error:[/] {vm}: {escape(why)}")
    if not result.ok:
        err.print(f"[red]Apply failed[/] for {len(result.failed_vms)} VM(s). Re-run apply after fixing the cause.")
        return 1
    out.print(f"\n[green bold]Apply complete![/] Resources: {done}.")
    remaining = [c for c in after.plan.changes if c.steps]
    if remaining:
        err.print(f"[yellow]warning:[/] the host has not converged yet: {summary_line(after.plan)}")
        return 1
    if after.plan.pending or after.plan.refused:
        out.print(summary_line(after.plan))
        return 1 if after.plan.refused else 0
    return 0


def _refuse_if_daemon_runs(layout: StateLayout) -> None:
    try:
        with StateLock(layout.daemon_lock, exclusive=True, wait=0):
            pass
    except LockTimeout as exc:
        raise CliError(f"a sync daemon runs on {layout.root}: it applies the manifests itself "
                       "(stop it first to apply by hand)") from exc


def _refuse_empty_directory(snap: Snapshot, allowed: bool) -> None:
    """A directory without any manifest is far more often a wrong path or a checkout in progress than a
    wish to delete every VM: that needs --allow-empty."""
    if not snap.manifests.files and snap.records and not allowed:
        raise CliError(f"{snap.manifests.directory} holds no manifests: refusing to delete all "
                       f"{len(snap.records)} VM(s); pass --allow-empty if that is what you want")


def _check_fresh(saved: Plan, current: Plan, layout: StateLayout) -> None:
    if saved.state_dir != str(layout.root):
        raise CliError(f"the saved plan is for state directory {saved.state_dir}, not {layout.root}")
    if saved.desired_digest != current.desired_digest:
        raise CliError("the saved plan is stale: the manifests changed since it was computed; plan again")
    if saved.observed_digest != current.observed_digest or saved.changes != current.changes:
        raise CliError("the saved plan is stale: the host changed since it was computed; plan again")


# -- status -----------------------------------------------------------------------------------------


def _phase(snap: Snapshot, name: str) -> str:
    vm = snap.observed.vm(name)
    if vm.process is not None:
        return {"running": "Running", "paused": "Paused", "unreachable": "Unknown"}.get(
            vm.process.status, vm.process.status.capitalize())
    return "Stopped" if name in snap.records else "Pending"


def _daemon_status(layout: StateLayout, host: str | None) -> dict[str, VMStatus]:
    store = open_readonly(layout.database, host or "")
    if store is None:
        return {}
    try:
        return store.statuses()
    finally:
        store.close()


def status_rows(snap: Snapshot, daemon: dict[str, VMStatus] | None = None) -> list[dict[str, Any]]:
    daemon = daemon or {}
    rows = []
    for change in snap.plan.changes:
        name = change.name
        vm = snap.observed.vm(name)
        loaded = snap.manifests.vms.get(name)
        rows.append({
            "name": name,
            "phase": _phase(snap, name),
            "pid": vm.process.pid if vm.process else None,
            "runStrategy": loaded.vm.spec.runStrategy if loaded else None,
            "inSync": not (change.steps or change.pending_restart or change.refusals or change.unplug_pending),
            "action": change.action.value if change.steps else None,
            "pendingRestart": change.pending_restart,
            "refused": change.refusals,
            "unplugPending": change.unplug_pending,
            "disks": {n: d.virtual_size for n, d in vm.disks.items() if d.exists},
            "manifest": loaded.source.file if loaded else None,
            "revision": snap.records[name].revision if name in snap.records else None,
            "conditions": daemon[name].conditions if name in daemon else {},
            "lastReconcile": daemon[name].last_reconcile if name in daemon else None,
        })
    return rows


def network_rows(snap: Snapshot) -> list[dict[str, Any]]:
    rows = []
    names = sorted(set(snap.manifests.networks) | set(snap.observed.network_records))
    for name in names:
        loaded = snap.manifests.networks.get(name)
        record = snap.observed.network_records.get(name)
        network = loaded.network if loaded else record.network if record else None
        if network is None:
            continue
        link = snap.observed.host.links.get(network.spec.bridge)
        dhcp = snap.observed.host.dhcp.get(name)
        change = next((c for c in snap.plan.changes if c.resource == "Network" and c.name == name), None)
        rows.append({
            "name": name,
            "bridge": network.spec.bridge,
            "up": bool(link and link.up),
            "addresses": link.addresses if link else [],
            "nat": network.spec.nat,
            "dhcpPid": dhcp.pid if dhcp else None,
            "leases": [lease.model_dump() for lease in dhcp.leases] if dhcp else [],
            "inSync": change is None or not (change.steps or change.refusals),
        })
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    layout = _layout(args)
    directory = args.directory or files.read_source(layout)
    if directory is None:
        raise CliError("no manifest directory given and none applied yet: infinization status DIR")
    snap = asyncio.run(_snapshot(directory, layout, allow_restart=False, host=args.host, tolerate_errors=True))
    rows = status_rows(snap, _daemon_status(layout, args.host))
    if args.json:
        print(json.dumps({"format_version": 1, "manifests": directory, "vms": rows,
                          "networks": network_rows(snap)}, indent=2))
        return 0
    table = Table(title=f"VMs on this host (manifests: {directory})")
    for column in ("NAME", "PHASE", "PID", "IN SYNC", "REVISION", "NOTES"):
        table.add_column(column)
    for row in rows:
        notes = []
        if row["action"]:
            notes.append(f"pending: {row['action']}")
        notes += [f"restart pending: {cause}" for cause in row["pendingRestart"]]
        notes += [f"refused: {why}" for why in row["refused"]]
        notes += [f"unplug pending: {why}" for why in row["unplugPending"]]
        notes += [c for c in conditions_text(row["conditions"]) if c != "Ready" and not c.startswith(
            ("RestartRequired", "Refused", "UnplugPending"))]
        table.add_row(row["name"], row["phase"], str(row["pid"] or "-"), "yes" if row["inSync"] else "no",
                      row["revision"] or "-", escape("\n".join(notes)))
    out.print(table)
    networks = network_rows(snap)
    if networks:
        net_table = Table(title="Networks")
        for column in ("NAME", "BRIDGE", "UP", "ADDRESS", "NAT", "DHCP LEASES", "IN SYNC"):
            net_table.add_column(column)
        for row in networks:
            leases = "\n".join(f"{lease['ip']} {lease['mac']}" for lease in row["leases"]) or "-"
            net_table.add_row(row["name"], row["bridge"], "yes" if row["up"] else "no",
                              ", ".join(row["addresses"]) or "-", "yes" if row["nat"] else "no", leases,
                              "yes" if row["inSync"] else "no")
        out.print(net_table)
    return 0


# -- small commands ---------------------------------------------------------------------------------


def cmd_logs(args: argparse.Namespace) -> int:
    layout = _layout(args)
    data = files.read_serial(layout.vm(args.name))
    if data is None:
        raise CliError(f"no serial log for VM {args.name!r} ({layout.vm(args.name).serial})")
    lines = data.decode(errors="replace").splitlines()
    if args.tail:
        lines = lines[-args.tail:]
    sys.stdout.write("\n".join(lines) + ("\n" if lines else ""))
    return 0


def cmd_start_stop(args: argparse.Namespace) -> int:
    """Imperative start/stop of one VM (for runStrategy Manual): the manifests are never rewritten."""
    layout = _layout(args)
    directory = args.directory or files.read_source(layout)
    if directory is None:
        raise CliError("no manifest directory given and none applied yet: --manifests DIR")
    names = frozenset([args.name])
    options = PlanOptions(start=names) if args.command == "start" else PlanOptions(stop=names)
    with StateLock(layout.lock, exclusive=True, wait=args.lock_timeout):
        snap = asyncio.run(_snapshot(directory, layout, False, args.host, options))
        change = snap.plan.change(args.name)
        if change is None or args.name not in snap.manifests.vms:
            raise CliError(f"no VirtualMachine {args.name!r} in {directory}")
        if change.refusals:
            raise CliError("; ".join(change.refusals))
        wanted = StepKind.START if args.command == "start" else StepKind.STOP
        if not any(step.kind is wanted for step in change.steps):
            out.print(f"{args.name} is already {'running' if args.command == 'start' else 'stopped'}.")
            return 0
        only = snap.plan.model_copy(update={"changes": [change]})
        result = asyncio.run(Executor(layout, _print_step, {}).run(only))
    return 0 if result.ok else 1


def cmd_sync(args: argparse.Namespace) -> int:
    layout = _layout(args)
    options = Options(host=args.host, dry_run=args.dry_run, allow_restart=args.allow_restart,
                      debounce_ms=args.debounce_ms, resync_seconds=args.resync_interval)
    directory = Path(args.directory)
    if not directory.is_dir():
        raise CliError(f"{directory} is not a directory")
    metrics_address = None if args.metrics_address == "none" else args.metrics_address
    return run_daemon(directory, layout, options, args.database, metrics_address)


def cmd_events(args: argparse.Namespace) -> int:
    layout = _layout(args)
    store = open_readonly(layout.database, args.host or "")
    if store is None:
        raise CliError(f"no event store yet ({layout.database}): it is written by `infinization sync`")
    try:
        events = store.events(args.name, limit=args.limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    table = Table(title=f"Events{' of ' + args.name if args.name else ''}")
    for column in ("TIME", "VM", "KIND", "RESULT", "MESSAGE"):
        table.add_column(column)
    for event in events:
        when = time.strftime("%H:%M:%S", time.localtime(event["ts"]))
        table.add_row(when, event["vm"], event["kind"], event["result"], escape(event["message"]))
    out.print(table)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    manifests = _load(args.directory)
    out.print(f"{len(manifests.vms)} VirtualMachine(s) in {len(manifests.files)} file(s): valid.")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    schema = VirtualMachine.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Infinization VirtualMachine (infinization.io/v1alpha1)"
    print(json.dumps(schema, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinization", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--version", action="version", version=f"infinization {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help="where the reconciler keeps its state "
                        "(default: $INFINIZATION_STATE_DIR or /var/lib/infinization)")
    common.add_argument("--lock-timeout", type=float, default=60.0,
                        help="seconds to wait for another run on the same state directory (default 60)")
    common.add_argument("--host", help="this host's name: only VMs whose spec.host names it (default: VMs "
                        "without spec.host)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", parents=[common], help="show what apply would change")
    p.add_argument("directory")
    p.add_argument("--json", action="store_true", help="print the versioned JSON plan")
    p.add_argument("--out", help="save the plan to a file for `apply FILE`")
    p.add_argument("--detailed-exitcode", action="store_true", help="exit 0: no changes, 2: changes, 1: error")
    p.add_argument("--allow-restart", action="store_true", help="plan restarts for changes that need one")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", parents=[common], help="apply a manifest directory or a saved plan")
    p.add_argument("target", metavar="DIR|PLANFILE")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--allow-restart", action="store_true", help="restart VMs whose changes need it")
    p.add_argument("--allow-empty", action="store_true",
                   help="allow an empty manifest directory to delete every VM")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("status", parents=[common], help="list VMs, their phase and whether they match")
    p.add_argument("directory", nargs="?", help="manifest directory (default: the one last applied)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("sync", parents=[common], help="keep the host converged with DIR, continuously")
    p.add_argument("directory")
    p.add_argument("--dry-run", action="store_true", help="warn-only: compute and report plans, change nothing")
    p.add_argument("--allow-restart", action="store_true", help="restart VMs whose changes need it")
    p.add_argument("--database", help="mirror status and events to PostgreSQL (postgresql://...)")
    p.add_argument("--metrics-address", default="127.0.0.1:9464",
                   help="Prometheus metrics HOST:PORT, or 'none' (default 127.0.0.1:9464)")
    p.add_argument("--resync-interval", type=float, default=30.0, help="full resync period, seconds (default 30)")
    p.add_argument("--debounce-ms", type=int, default=50, help="manifest change debounce (default 50 ms)")
    p.set_defaults(func=cmd_sync)

    for verb in ("start", "stop"):
        p = sub.add_parser(verb, parents=[common], help=f"{verb} one VM now (for runStrategy Manual)")
        p.add_argument("name")
        p.add_argument("--manifests", dest="directory", help="manifest directory (default: the last applied)")
        p.set_defaults(func=cmd_start_stop)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CliError, LockTimeout, ValueError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
