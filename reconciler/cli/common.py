"""What every ``infinization`` command shares: the consoles, the CLI's error, and ``read_view``.

``read_view`` is the CLI's one pass through the layers: load the manifests (spec), read the last-applied
records (state), observe the host (observe) and plan (plan). ``plan``, ``apply``, ``status``, ``start``
and ``stop`` call it; none of them takes a different path to the host's state.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from reconciler.cli.console import err, out
from reconciler.cli.manifests import load_manifests
from reconciler.errors import CorruptRecord, Permanent
from reconciler.spec import macs
from reconciler.spec.host import HostConfig
from reconciler.spec.loader import ManifestSet, load_directory, load_host_config
from reconciler.state import files
from reconciler.state.layout import StateLayout, state_dir_from_env

if TYPE_CHECKING:  # the layers behind plan and apply: imported where used, so validate and --version skip them
    from reconciler.apply.executor import StepResult
    from reconciler.plan.actions import Plan
    from reconciler.plan.observed import ObservedState, ObservedVM
    from reconciler.plan.planner import PlanOptions
    from reconciler.state.models import AppliedRecord

__all__ = ["CliError", "View", "config_of", "err", "layout_of", "load_manifests", "out", "print_step", "read_view"]


class CliError(Permanent):
    """A situation the user must resolve (a wrong argument, a stale plan, a daemon in the way): printed as
    one ``error:`` line, exit 1."""


# repr=False: Python 3.11's asyncio.run() formats its main task's repr (the result included) when it puts
# back the SIGINT handler; a View's generated repr (every model of the plan and the observed state) cost
# milliseconds of CPU per VM on every command.
@dataclass(repr=False)
class View:
    """What one command sees: the manifests as read, the last-applied records, the host, and the plan."""

    manifests: ManifestSet
    records: dict[str, AppliedRecord]
    observed: ObservedState
    plan: Plan
    config: HostConfig


def layout_of(args: argparse.Namespace) -> StateLayout:
    return StateLayout(state_dir_from_env(args.state_dir))


def config_of(args: argparse.Namespace) -> HostConfig:
    """The host's policy (``--config``, ``$INFINIZATION_CONFIG`` or /etc/infinization/config.yaml)."""
    return load_host_config(getattr(args, "config", None))


def canonical_dir(directory: str | Path) -> str:
    """The manifest directory as recorded and compared: absolute with symlinks resolved, so the same
    directory reached through a symlink (or ``..``) is the same source, and its VMs are not taken for
    another directory's (kept, never pruned) or ours (pruned) by the spelling of the path."""
    return str(Path(directory).resolve())


def canonical_file(directory: str | Path, file: str) -> str:
    """A manifest file's path under ``canonical_dir``: the directory resolved, the file's own name kept
    (a file that is itself a symlink is recorded by the name it has in the directory)."""
    try:
        return str(Path(canonical_dir(directory)) / Path(file).relative_to(directory))
    except ValueError:  # not under it (cannot happen for load_directory's files): as it is, absolute
        return str(Path(file).absolute())


def _read_records(layout: StateLayout) -> dict[str, AppliedRecord]:
    try:
        return files.read_records(layout)
    except CorruptRecord as exc:
        # The record's own message names the file and what to do; say only what kind of file it is.
        raise CliError(f"corrupt state record: {exc}") from exc


def _load_warning(directory: str) -> ManifestSet:
    """For ``status``: a broken file is a warning, not an error."""
    manifests = load_directory(directory)
    for error in manifests.errors:
        err.print(f"[yellow]warning:[/] {escape(str(error))}")
    return manifests


async def read_view(directory: str, layout: StateLayout, allow_restart: bool, host: str | None = None,
                    options: PlanOptions | None = None, tolerate_errors: bool = False, *,
                    config: HostConfig, ask_agent: bool = False, manifests: ManifestSet | None = None,
                    known: Mapping[str, ObservedVM] | None = None) -> View:
    """The manifests (or ``manifests`` as already read: apply's check after its run is against what it
    applied), the records, the host observed (``known``: VMs the caller observed already), and the plan."""
    from reconciler.observe.snapshot import observe
    from reconciler.plan.planner import PlanOptions, plan
    from reconciler.runtime.desired import from_records, keep_last_good

    if manifests is None:
        manifests = _load_warning(directory) if tolerate_errors else load_manifests(directory)
    all_records = _read_records(layout)
    if manifests.errors:
        # Only with tolerate_errors (``status``): the VMs of a broken file are shown against their last
        # applied spec, by the sync daemon's rule, so both tell the same story.
        manifests.vms = keep_last_good(manifests, from_records(all_records)).vms
    # A VM belongs to the host its spec names (none: hosts run without --host).
    desired = {name: loaded.vm for name, loaded in manifests.vms.items() if loaded.vm.spec.host == host}
    # Every NIC gets its address now: a recorded one is kept, a new one is derived without collisions.
    desired, resolved = macs.resolve(desired, {name: record.vm for name, record in all_records.items()})
    records = {name: record.model_copy(update={"vm": resolved[name]}) for name, record in all_records.items()
               if record.vm.spec.host == host}
    networks = {name: loaded.network for name, loaded in manifests.networks.items()}
    observed = await observe(layout, desired, records, networks, host=config, ask_agent=ask_agent, known=known)
    result = plan(desired, observed, records, networks=networks, manifest_dir=canonical_dir(directory),
                  desired_digest=manifests.digest(),
                  options=options or PlanOptions(allow_restart=allow_restart), host=config)
    return View(manifests, records, observed, result, config)


def print_step(result: StepResult) -> None:
    """The executor's progress callback: one line per step as it ends."""
    mark = "[green]ok[/]" if result.ok else "[red]FAILED[/]"
    out.print(f"  {result.step.name}: {escape(result.step.summary)} ... {mark} [dim]({escape(result.detail)}, "
              f"{result.seconds * 1000:.0f} ms)[/]")
