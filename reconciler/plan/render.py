"""Render a Plan for people, Terraform style: legend, one block per VM with its reasons, a summary line.

Reads only the Plan data (never recomputes anything), so what is shown is exactly what ``--json`` says
and what ``apply`` runs. Returns rich markup; the CLI prints it (plain text when not on a terminal).
"""

from __future__ import annotations

from typing import Any

from reconciler.plan.actions import Action, Change, Mode, Plan

_STYLE = {
    Action.CREATE: "green",
    Action.UPDATE: "yellow",
    Action.RESTART: "magenta",
    Action.DELETE: "red",
    Action.NOOP: "dim",
}
_VERB = {
    Action.CREATE: "will be created",
    Action.UPDATE: "will be updated in place",
    Action.RESTART: "will be restarted",
    Action.DELETE: "will be deleted",
    Action.NOOP: "is unchanged",
}


def _value(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, str):
        return value
    return repr(value)


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def summary_line(plan: Plan) -> str:
    counts = plan.counts()
    line = (
        f"Plan: {counts[Action.CREATE]} to create, {counts[Action.UPDATE]} to update, "
        f"{counts[Action.RESTART]} to restart, {counts[Action.DELETE]} to delete."
    )
    extra = []
    if plan.pending:
        extra.append(f"{len(plan.pending)} restart pending")
    if plan.refused:
        extra.append(f"{len(plan.refused)} refused")
    return line + (f" ({', '.join(extra)})" if extra else "")


def _render_change(change: Change) -> list[str]:
    lines: list[str] = []
    style = _STYLE[change.action]
    if change.refusals:
        lines.append(f"  [bold red]x[/] {change.resource} [bold]{change.name}[/] [red]cannot be changed[/]")
        lines += [f"      [red]refused:[/] {_escape(reason)}" for reason in change.refusals]
    elif change.steps:
        lines.append(
            f"  [{style}]{change.action.symbol}[/] {change.resource} [bold]{change.name}[/] {_VERB[change.action]}"
        )
    elif change.pending_restart:
        lines.append(f"  [magenta]![/] {change.resource} [bold]{change.name}[/] has changes that need a restart")
    elif change.kept:
        return [f"  [cyan]=[/] {change.resource} [bold]{change.name}[/] is kept",
                f"      [dim]# {_escape(change.kept)}[/]", ""]
    else:
        return []
    lines += [f"      [dim]# {_escape(reason)}[/]" for reason in change.reasons]
    for field in change.fields:
        if field.mode is Mode.RESTART and (change.pending_restart or change.action is Action.RESTART):
            continue  # listed once, as the causes of the (pending) restart
        if field.path == "rule":  # firewall rule-level diff: a rule is added or removed, never edited
            sign, text = ("[green]+[/]", field.after) if field.after is not None else ("[red]-[/]", field.before)
            lines.append(f"      {sign} rule {_escape(_value(text))}")
            continue
        colour = {Mode.LIVE: "yellow", Mode.RESTART: "magenta", Mode.REFUSED: "red"}[field.mode]
        arrow = f"{_value(field.before)} -> {_value(field.after)}"
        how = field.how if field.mode is Mode.REFUSED else f"{field.mode.value}: {field.how}"
        how += "; drift: changed outside the reconciler" if field.drift else ""
        lines.append(f"      [{colour}]~[/] {_escape(field.path)}: {_escape(arrow)}  [dim]({_escape(how)})[/]")
    lines += [f"      [cyan]opens:[/] {_escape(entry)}" for entry in change.opens]
    for index, step in enumerate(change.steps, 1):
        lines.append(f"      {index}. {_escape(step.summary)}")
    lines += [f"      [yellow]unplug pending:[/] {_escape(note)}" for note in change.unplug_pending]
    if change.pending_restart:
        lines.append("      [magenta]restart pending[/] (apply --allow-restart, or set spec.restartPolicy: Auto):")
        lines += [f"        - {_escape(cause)}" for cause in change.pending_restart]
    lines.append("")
    return lines


def render_plan(plan: Plan) -> str:
    """The full human preview of a plan."""
    body: list[str] = []
    for change in plan.changes:
        body += _render_change(change)
    if plan.empty:
        kept = [line for change in plan.changes if change.kept for line in _render_change(change)]
        return "[green]No changes.[/] The host matches the manifests.\n" + (
            "\nNot in these manifests, and left alone:\n\n" + "\n".join(kept) if kept else "")
    head = [
        "Infinization will perform the following actions "
        "([green]+[/] create, [yellow]~[/] update in place, [magenta]-/+[/] restart, [red]-[/] delete):",
        "",
    ]
    return "\n".join([*head, *body, f"[bold]{summary_line(plan)}[/]"]) + "\n"
