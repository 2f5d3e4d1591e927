"""The small ``infinization`` commands: start, stop, sync, events, logs, completion.

Called by ``cli.parser`` (each ``cmd_*`` is a subcommand's handler). Each only wires existing layers:
``start``/``stop`` plan one VM with ``PlanOptions`` and run that change; ``sync`` hands over to the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from typing import Any

from rich.markup import escape
from rich.table import Table

from reconciler.apply.executor import Executor
from reconciler.apply.lock import StateLock
from reconciler.cli.common import CliError, config_of, layout_of, out, read_view
from reconciler.cli.progress import StepProgress
from reconciler.cli.recording import record_run
from reconciler.cli.terminal import printable, vm_name
from reconciler.plan.planner import PlanOptions
from reconciler.plan.steps import StepKind
from reconciler.runtime.store import open_readonly
from reconciler.state import files


def cmd_logs(args: argparse.Namespace) -> int:
    layout = layout_of(args)
    name = vm_name(args.name)  # before any path is built from it: `logs ../../x` reads nothing
    data = files.read_serial(layout.vm(name))
    if data is None:
        raise CliError(f"no serial log for VM {name!r} ({layout.vm(name).serial})")
    # The guest wrote it: only printable text reaches the terminal (escape sequences are shown, not run).
    lines = printable(data.decode(errors="replace")).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if args.tail:
        lines = lines[-args.tail:]
    sys.stdout.write("\n".join(lines) + ("\n" if lines else ""))
    return 0


def cmd_start_stop(args: argparse.Namespace) -> int:
    """Imperative start/stop of one VM (for runStrategy Manual), or resume of one QEMU paused by itself (a disk
    error, a panic: never resumed by the reconciler unasked): the manifests are never rewritten."""
    layout = layout_of(args)
    vm_name(args.name)
    directory = args.directory or files.read_source(layout)
    if directory is None:
        raise CliError("no manifest directory given and none applied yet: --manifests DIR")
    names = frozenset([args.name])
    options = {"start": PlanOptions(start=names), "stop": PlanOptions(stop=names),
               "resume": PlanOptions(resume=names)}[args.command]
    with StateLock(layout.lock, exclusive=True, wait=args.lock_timeout):
        view = asyncio.run(read_view(directory, layout, False, args.host, options,
                                         config=config_of(args)))
        change = view.plan.change(args.name)
        if change is None or args.name not in view.manifests.vms:
            raise CliError(f"no VirtualMachine {args.name!r} in {directory}")
        if change.refusals:
            raise CliError("; ".join(change.refusals))
        wanted = {"start": StepKind.START, "stop": StepKind.STOP, "resume": StepKind.RESUME}[args.command]
        if not any(step.kind is wanted for step in change.steps):
            already = {"start": "running", "stop": "stopped", "resume": "running or not paused by QEMU (a VM "
                       "paused by spec.paused is resumed by setting it to false)"}[args.command]
            out.print(f"{args.name} is already {already}.")
            return 0
        if args.command == "resume":  # only the resume (and the record): not the rest of the VM's plan
            change = change.model_copy(update={"steps": [st for st in change.steps if st.kind in (
                StepKind.RESUME, StepKind.WRITE_RECORD)]})
        only = view.plan.model_copy(update={"changes": [change]})
        with StepProgress(out) as progress:
            executor = Executor(layout, progress.ended, {}, host=view.config, started=progress.started)
            result = asyncio.run(executor.run(only))
        after = asyncio.run(read_view(directory, layout, False, args.host, config=view.config))
        record_run(layout, args.host, result, view, after)
    return 0 if result.ok else 1


def cmd_events(args: argparse.Namespace) -> int:
    layout = layout_of(args)
    if args.name and args.name != "-":  # "-": the daemon's own events (manifests, start, stop)
        vm_name(args.name)
    store = open_readonly(layout.database, args.host)
    if store is None:
        raise CliError(f"no event store yet ({layout.database}): it is written by `infinization sync`")
    try:
        events = store.events(args.name, limit=args.limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"formatVersion": 1, "events": [_event_json(event) for event in events]}, indent=2))
        return 0
    table = Table(title=f"Events{' of ' + args.name if args.name else ''}")
    for column in ("TIME", "VM", "KIND", "RESULT", "MESSAGE"):
        table.add_column(column)
    for event in events:
        when = time.strftime("%H:%M:%S", time.localtime(event["ts"]))
        table.add_row(when, event["vm"], event["kind"], event["result"], escape(printable(event["message"])))
    out.print(table)
    return 0


def _event_json(event: dict[str, Any]) -> dict[str, Any]:
    """One event as ``events --json`` publishes it: camelCase, the time as RFC 3339 UTC and epoch seconds."""
    when = datetime.datetime.fromtimestamp(event["ts"], datetime.UTC).isoformat(timespec="milliseconds")
    return {"time": when.replace("+00:00", "Z"), "ts": event["ts"], "vm": event["vm"], "kind": event["kind"],
            "result": event["result"], "message": event["message"], "durationMs": event["duration_ms"]}


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    from reconciler.cli.parser import build_parser

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0
