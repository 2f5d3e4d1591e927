"""``infinization plan`` and ``infinization apply``: show the plan, and carry it out under the run lock.

Called by ``cli.parser`` (each ``cmd_*`` is a subcommand's handler). ``apply`` takes the run lock and
refuses while a sync daemon runs, so the two never race; ``plan`` reads without any lock.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from reconciler import __version__
from reconciler.cli.common import (
    CliError,
    View,
    canonical_dir,
    canonical_file,
    config_of,
    err,
    layout_of,
    out,
    read_view,
)
from reconciler.cli.console import human_output
from reconciler.errors import LockTimeout
from reconciler.plan.actions import Action, Change, Plan
from reconciler.plan.planner import PlanOptions
from reconciler.plan.render import render_plan, summary_line
from reconciler.runtime.gitrev import revision
from reconciler.spec.loader import load_directory
from reconciler.state import files
from reconciler.state.files import write_atomic
from reconciler.state.layout import StateLayout

if TYPE_CHECKING:
    from reconciler.apply.executor import ApplyResult
    from reconciler.plan.document import Diagnostic
    from reconciler.plan.observed import ObservedVM
    from reconciler.spec.models import VirtualMachine

# -- plan -------------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    layout = layout_of(args)
    if args.json and (broken := _diagnostics(args.directory)):
        from reconciler.plan.document import invalid_document

        # A CI consumer gets the manifest errors as data too (stderr still has them for people).
        print(json.dumps(invalid_document(broken, **_stamp(), manifest_dir=canonical_dir(args.directory)),
                         indent=2))
        return 1
    # Reading needs no lock: plan and status work while apply or the sync daemon runs.
    options = PlanOptions(allow_restart=args.allow_restart, prune_other_sources=args.prune_other_sources)
    view = asyncio.run(read_view(args.directory, layout, args.allow_restart, args.host, options,
                                config=config_of(args)))
    # The published document (its models, and dumping every step) only when it is printed or saved.
    document = _document(view.plan) if args.json or args.out else ""
    if args.out:
        write_atomic(Path(args.out), document + "\n")
    if args.json:
        print(document)
    else:
        out.print(render_plan(view.plan), end="")
        if args.out:
            out.print(f"\nSaved the plan to {args.out}. Run `infinization apply {args.out}` to apply exactly it.")
    if view.plan.refused:
        return 1
    if args.detailed_exitcode and not view.plan.empty:
        return 2
    return 0


def _document(plan: Plan) -> str:
    """The plan as the published JSON document (docs/plan-format.md)."""
    from reconciler.plan.document import plan_document  # `plan` without --json/--out never builds it

    return json.dumps(plan_document(plan, **_stamp()), indent=2)


def _stamp() -> dict[str, str]:
    """The version and time every published plan document carries."""
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {"version": __version__, "timestamp": now}


def _diagnostics(directory: str) -> list[Diagnostic]:
    from reconciler.plan.document import Diagnostic

    errors = load_directory(directory).errors
    return [Diagnostic(file=e.file, line=e.line, column=e.col, field=e.path, message=e.message) for e in errors]


# -- apply ------------------------------------------------------------------------------------------


def cmd_apply(args: argparse.Namespace) -> int:
    layout = layout_of(args)
    target = Path(args.target)
    saved = None if target.is_dir() else _read_saved_plan(target)
    # A saved plan carries its own manifest directory and --allow-restart: apply exactly what was shown.
    directory = saved.manifest_dir if saved else args.target
    if args.json and saved is None and not args.yes:
        raise CliError("apply --json needs --yes (or a saved plan): a confirmation prompt would mix with the "
                       "document")
    if args.json and saved is None and (broken := _diagnostics(directory)):
        from reconciler.plan.document import invalid_document

        print(json.dumps(invalid_document(broken, **_stamp(), manifest_dir=canonical_dir(directory)), indent=2))
        return 1
    # With --json, stdout carries only the document: the plan and the step lines go to stderr.
    with human_output(to_stderr=args.json):
        run = _apply(args, layout, saved, directory)
    if args.json:
        from reconciler.plan.apply_document import apply_document  # only --json pays for the document models

        outcomes = run.result.results if run.result else []
        failed = run.result.failed_vms if run.result else {}
        permanent = run.result.permanent if run.result else set()
        print(json.dumps(apply_document(run.view.plan, outcomes, failed, permanent,
                                        run.after.plan if run.after else None, **_stamp()), indent=2))
    return run.code


@dataclass
class _Run:
    """What one apply did: the view it planned from, the executor's result and the re-plan (None when
    nothing ran), and its exit code."""

    view: View
    code: int
    result: ApplyResult | None = None
    after: View | None = None


def _apply(args: argparse.Namespace, layout: StateLayout, saved: Plan | None, directory: str) -> _Run:
    allow_restart = saved.allow_restart if saved else args.allow_restart
    prune = saved.prune_other_sources if saved else args.prune_other_sources
    options = PlanOptions(allow_restart=allow_restart, prune_other_sources=prune)
    config = config_of(args)
    from reconciler.apply.lock import StateLock  # apply's only: `plan` imports nothing of the apply layer

    _refuse_if_daemon_runs(layout)
    with StateLock(layout.lock, exclusive=True, wait=args.lock_timeout):
        view = asyncio.run(read_view(directory, layout, allow_restart, args.host, options, config=config))
        _refuse_empty_directory(view, args.allow_empty)
        if saved is not None:
            _check_fresh(saved, view.plan, layout)
        out.print(render_plan(view.plan), end="")
        if not any(change.steps for change in view.plan.changes):
            return _Run(view, 1 if view.plan.refused else 0)
        if saved is None and not _confirm(args):
            out.print("Apply cancelled.")
            return _Run(view, 1)
        out.print("")

        async def run_and_check() -> tuple[ApplyResult, View]:
            early = _EarlyObservations(layout, view)
            result = await _execute(view, layout, args.jobs, early.finished)
            # The check after the run plans again against the manifests it applied (not re-read and
            # re-parsed), with the VMs observed as their changes ended.
            return result, await read_view(directory, layout, allow_restart, args.host, options, config=config,
                                           manifests=view.manifests, known=await early.results())

        result, after = asyncio.run(run_and_check())
        from reconciler.cli.recording import record_run  # the status store: only apply writes it

        record_run(layout, args.host, result, view, after, revision(Path(view.plan.manifest_dir)))
    return _Run(view, _report(view.plan, result, after.plan), result, after)


async def _execute(view: View, layout: StateLayout, jobs: int | None,
                   finished: Callable[[Change, bool], None]) -> ApplyResult:
    from reconciler.apply.executor import Executor  # only apply pays for the executor's imports (not plan)
    from reconciler.cli.progress import StepProgress

    files.write_source(layout, view.plan.manifest_dir)
    # Absolute: the sync daemon, started elsewhere, matches a record's file against the broken ones.
    sources = {name: canonical_file(view.manifests.directory, loaded.source.file)
               for name, loaded in view.manifests.vms.items()}
    rev = revision(Path(view.plan.manifest_dir))
    with StepProgress(out) as progress:
        executor = Executor(layout, progress.ended, sources, revision=rev, host=view.config, jobs=jobs,
                            started=progress.started, finished=finished)
        return await executor.run(view.plan)


class _EarlyObservations:
    """apply's check after its run, begun VM by VM: a VM whose change has ended is observed at once, while
    the other VMs' changes go on, instead of all of them after the last one (creating 16 VMs, that last
    observation of every QEMU, each busy booting its guest, took ~0.37 s). Nothing changes a VM after its
    own change has ended, so the observation is the one the check would make; a VM whose change failed, or
    that could not be observed early, is observed with the rest."""

    def __init__(self, layout: StateLayout, view: View) -> None:
        self.layout, self.view = layout, view
        self.tasks: dict[str, asyncio.Task[ObservedVM]] = {}

    def finished(self, change: Change, ok: bool) -> None:
        loaded = self.view.manifests.vms.get(change.name)
        if ok and change.resource == "VirtualMachine" and loaded is not None:
            self.tasks[change.name] = asyncio.ensure_future(self._observe(change.name, loaded.vm))

    async def _observe(self, name: str, desired: VirtualMachine) -> ObservedVM:
        from reconciler.observe.snapshot import disk_names, observe_vm

        record = files.read_record(self.layout.vm(name))  # the disks the check names: desired and recorded
        return await observe_vm(self.layout, name, disk_names([desired, *([record.vm] if record else [])]))

    async def results(self) -> dict[str, ObservedVM]:
        done = await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        return {name: found for name, found in zip(self.tasks, done, strict=True)
                if not isinstance(found, BaseException)}


def _report(done_plan: Plan, result: ApplyResult, after: Plan) -> int:
    """What apply did, and whether the host now matches (a re-plan after the run must find nothing to do)."""
    counts = done_plan.counts()
    done = ", ".join(f"{counts[a]} {verb}" for a, verb in (
        (Action.CREATE, "created"), (Action.UPDATE, "updated"), (Action.RESTART, "restarted"),
        (Action.DELETE, "deleted")))
    for vm, why in result.failed_vms.items():
        err.print(f"[red]error:[/] {vm}: {escape(why)}")
    if not result.ok:
        err.print(f"[red]Apply failed[/] for {len(result.failed_vms)} VM(s). Re-run apply after fixing the cause.")
        return 1
    out.print(f"\n[green bold]Apply complete![/] Resources: {done}.")
    if any(c.steps for c in after.changes):
        err.print(f"[yellow]warning:[/] the host has not converged yet: {summary_line(after)}")
        return 1
    if after.pending or after.refused:
        out.print(summary_line(after))
        return 1 if after.refused else 0
    return 0


def _confirm(args: argparse.Namespace) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise CliError("refusing to apply without confirmation: stdin is not a terminal (use --yes)")
    answer = out.input("\nDo you want to perform these actions? Only 'yes' will be accepted: ")
    return answer.strip() == "yes"


def _read_saved_plan(path: Path) -> Plan:
    from reconciler.plan.document import PlanFormatError, plan_from_document

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read saved plan {path}: {exc}") from exc
    try:
        return plan_from_document(data)
    except PlanFormatError as exc:
        raise CliError(f"{path}: {exc}") from exc


def _refuse_if_daemon_runs(layout: StateLayout) -> None:
    from reconciler.apply.lock import StateLock

    try:
        with StateLock(layout.daemon_lock, exclusive=True, wait=0):
            pass
    except LockTimeout as exc:
        raise CliError(f"a sync daemon runs on {layout.root}: it applies the manifests itself "
                       "(stop it first to apply by hand)") from exc


def _refuse_empty_directory(view: View, allowed: bool) -> None:
    """A directory without any manifest is far more often a wrong path or a checkout in progress than a
    wish to delete every VM: that needs --allow-empty."""
    if not view.manifests.files and view.records and not allowed:
        raise CliError(f"{view.manifests.directory} holds no manifests: refusing to delete all "
                       f"{len(view.records)} VM(s); pass --allow-empty if that is what you want")


def _check_fresh(saved: Plan, current: Plan, layout: StateLayout) -> None:
    if saved.state_dir != str(layout.root):
        raise CliError(f"the saved plan is for state directory {saved.state_dir}, not {layout.root}")
    if saved.desired_digest != current.desired_digest:
        raise CliError("the saved plan is stale: the manifests changed since it was computed; plan again")
    if saved.observed_digest != current.observed_digest or saved.changes != current.changes:
        raise CliError("the saved plan is stale: the host changed since it was computed; plan again")
