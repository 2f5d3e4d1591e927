"""The published JSON form of a plan (``plan --json``, ``plan --out``): versioned, camelCase, documented.

``docs/plan-format.md`` is its reference and compatibility promise; ``plan_document_schema()`` is its JSON
Schema (``infinization schema plan``). It wraps the ``Plan`` model (whose own fields are serialised by
alias, in camelCase) with what a CI consumer needs without re-deriving it: the tool's version and the time
of the plan, summary counts, whether applying would do anything (``applyable``), whether some change is
refused (``errored``) or the host would still differ afterwards (``complete``), which steps destroy data,
and machine-readable codes for every refusal and restart cause. ``plan_from_document`` reads a saved
document back for ``apply PLANFILE``.

Pure: the version and the timestamp are arguments. Called by ``cli.plan_apply``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from reconciler.plan.actions import FORMAT_VERSION, Action, Change, FieldChange, Mode, Plan
from reconciler.plan.steps import StepKind


class _Doc(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


class Diagnostic(_Doc):
    """One manifest error (a plan with diagnostics has no changes: nothing acts on a broken directory)."""

    file: str
    line: int
    column: int
    field: str = Field(description="The manifest field, dotted (spec.disks[0].size); empty for the whole file.")
    message: str


class Summary(_Doc):
    create: int = Field(description="Resources that will be created.")
    update: int = Field(description="Resources changed in place (live).")
    restart: int = Field(description="VMs that will be restarted.")
    delete: int = Field(description="Resources that will be deleted.")
    unchanged: int = Field(description="Resources that already match.")
    pending_restart: int = Field(description="VMs with changes that need a restart not allowed by this plan.")
    refused: int = Field(description="Resources whose change cannot be applied (see each refusal's code).")
    drift: int = Field(description="Resources whose steps repair changes made outside the reconciler.")
    steps: int = Field(description="Steps apply would run.")
    destructive_steps: int = Field(description="Steps that destroy data (deleting a disk, TPM or EFI state).")


class Reason(_Doc):
    code: str = Field(description="Stable and machine-readable: refused.<field> / restart.<field> / a kind.")
    message: str = Field(description="For people; may change between versions.")


class PublishedStep(_Doc):
    kind: StepKind
    name: str = Field(description="The VM, Network or firewall the step acts on.")
    target: str = Field(description="The device or part (a disk, a NIC...), empty for the resource itself.")
    args: dict[str, Any] = Field(description="The kind's typed arguments (camelCase).")
    summary: str
    destroys_data: bool = Field(description="The step deletes what no later step can make again.")


class PublishedChange(_Doc):
    resource: Literal["VirtualMachine", "Network", "Firewall"]
    name: str
    action: Action
    reasons: list[str] = Field(description="Why, for people.")
    fields: list[FieldChange] = Field(description="Each changed field: before, after, live/restart/refused.")
    drift: list[str] = Field(description="Paths of the fields changed outside the reconciler.")
    steps: list[PublishedStep] = Field(description="What apply runs, in order.")
    pending_restart: list[Reason] = Field(description="Restart causes not allowed by this plan.")
    refusals: list[Reason] = Field(description="Why this change cannot be applied.")
    unplug_pending: list[str]
    opens: list[str] = Field(description="Host paths the steps make QEMU or qemu-img open.")
    source: str | None = Field(default=None, description="The manifest file the VM was last applied from.")
    kept: str | None = Field(default=None, description="Why a VM in no manifest is kept, not deleted (it came "
                             "from another directory; `--prune-other-sources` deletes it).")


class PlanDocument(_Doc):
    """What ``plan --json`` prints and ``plan --out`` saves (docs/plan-format.md)."""

    format_version: int = Field(description="Bumped on any incompatible change; additions keep it.")
    infinization_version: str
    timestamp: str = Field(description="When the plan was computed, RFC 3339 UTC.")
    manifest_dir: str
    state_dir: str | None = None
    desired_digest: str | None = Field(default=None, description="sha256 of the manifests as loaded.")
    observed_digest: str | None = Field(default=None, description="sha256 of what was observed.")
    allow_restart: bool = False
    prune_other_sources: bool = False
    applyable: bool = Field(description="apply would run at least one step.")
    errored: bool = Field(description="Some change is refused, or the manifests are invalid (diagnostics).")
    complete: bool = Field(description="After apply the host would match every manifest (nothing refused "
                           "or pending).")
    summary: Summary | None = None
    diagnostics: list[Diagnostic] = Field(default_factory=list)
    changes: list[PublishedChange] = Field(default_factory=list)


def _code(text: str) -> str:
    """A stable machine-readable code from a field path: ``disks[root].size`` -> ``disks.size``."""
    return re.sub(r"\[[^\]]*\]", "", text)


def refusal_code(change: Change, message: str) -> str:
    """The code of one refusal: ``refused.<field>`` when a refused field change explains it, else the kind
    of obstacle the planner's message names (the message itself is for people)."""
    for field in change.fields:
        if field.mode is Mode.REFUSED and (field.path in message or (field.how and field.how in message)):
            return f"refused.{_code(field.path)}"
    code = _by_words(message, _REFUSAL_CODES, "refused")
    if code == "refused" and (named := _SPEC_FIELD.match(message)):
        return f"refused.{_code(named.group(1))}"  # "spec.display.port: ..." -> refused.display.port
    return code


_SPEC_FIELD = re.compile(r"^spec\.([A-Za-z0-9.\[\]-]+): ")


def _by_words(message: str, table: tuple[tuple[tuple[str, ...], str], ...], default: str) -> str:
    lowered = message.lower()
    return next((code for words, code in table if all(word in lowered for word in words)), default)


# The planner's obstacles that are not a field change, by the words of their messages (first match wins).
# tests/unit/test_plan_document.py fails on any golden case's reason left with the bare default, so a new
# kind of refusal or restart cause gets its code here the day it is added.
_REFUSAL_CODES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("paused by qemu",), "refused.pausedByQemu"),
    (("hostdevices", "in use by the host"), "refused.hostDevice.inUse"),
    (("hostdevices", "does not let us unbind"), "refused.hostDevice.driver"),
    (("hostdevices", "held by vm"), "refused.hostDevice.held"),
    (("hostdevices", "also asked for by vm"), "refused.hostDevice.contended"),
    (("hostdevices", "no such"), "refused.hostDevice.missing"),
    (("hostdevices", "iommu"), "refused.hostDevice.iommu"),
    (("not in the host policy",), "refused.hostPolicy"),
    (("shrink",), "refused.diskShrink"),
    (("backing image",), "refused.backingImage"),
    (("in the state directory",), "refused.hostPolicy"),
    (("outside",), "refused.hostPolicy"),
    (("privileged",), "refused.hostPolicy"),
    (("not allowed",), "refused.hostPolicy"),
    (("was not observed",), "refused.hostPolicy"),
    (("not a regular file",), "refused.notRegularFile"),
    (("nic ", "bridge", "does not exist"), "refused.unknownNetwork"),
    (("does not exist",), "refused.missingPath"),
    (("monitor does not answer",), "refused.monitorUnreachable"),
    (("cannot read",), "refused.unreadable"),
    (("still use it",), "refused.inUse"),
    (("not created by infinization",), "refused.foreignBridge"),
    (("cannot be renamed",), "refused.bridgeRename"),
    (("firewall",), "refused.firewallUnsupported"),
    (("nf_conntrack",), "refused.firewallUnsupported"),
    (("nothing to boot",), "refused.nothingToBoot"),
    (("firmware",), "refused.firmware"),
    (("hot-plug",), "refused.needsRestart"),
    (("--allow-restart",), "refused.needsRestart"),
    (("taken",), "refused.nameTaken"),
)
_RESTART_CODES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("vcpus", "maxcpus"), "restart.cpu.maxCpus"),
    (("memory", "maxsize"), "restart.memory.maxSize"),
    (("no launch record",), "restart.unknownLaunch"),
    (("tap", "is gone"), "restart.tapGone"),
    (("display drift",), "restart.displayDrift"),
    (("monitor does not answer",), "restart.monitorUnreachable"),
    (("swtpm", "is gone"), "restart.tpmGone"),
)


def _restart_causes(change: Change) -> list[Reason]:
    """Each restart cause with the code of the field that needs it."""
    fields = [f for f in change.fields if f.mode is Mode.RESTART]
    causes = []
    for cause in change.pending_restart:
        field = next((f for f in fields if cause.startswith(f.path)), None)
        code = f"restart.{_code(field.path)}" if field else _by_words(cause, _RESTART_CODES, "restart")
        causes.append(Reason(code=code, message=cause))
    return causes


def _change(change: Change) -> PublishedChange:
    steps = [PublishedStep(kind=step.kind, name=step.name, target=step.target, summary=step.summary,
                           args=step.model_dump(mode="json", by_alias=True)["args"], destroys_data=step.destroys_data)
             for step in change.steps]
    return PublishedChange(
        resource=change.resource, name=change.name, action=change.action, reasons=change.reasons,
        fields=change.fields, drift=[f.path for f in change.fields if f.drift], steps=steps,
        pending_restart=_restart_causes(change),
        refusals=[Reason(code=refusal_code(change, m), message=m) for m in change.refusals],
        unplug_pending=change.unplug_pending, opens=change.opens, source=change.source, kept=change.kept)


def summary(plan: Plan) -> Summary:
    counts = plan.counts()
    return Summary(
        create=counts[Action.CREATE], update=counts[Action.UPDATE], restart=counts[Action.RESTART],
        delete=counts[Action.DELETE], unchanged=sum(1 for c in plan.changes if c.in_sync),
        pending_restart=len(plan.pending), refused=len(plan.refused),
        drift=sum(1 for c in plan.changes if c.drifted),
        steps=sum(len(c.steps) for c in plan.changes),
        destructive_steps=sum(1 for c in plan.changes for s in c.steps if s.destroys_data),
    )


def plan_document(plan: Plan, *, version: str, timestamp: str) -> dict[str, Any]:
    """The document ``plan --json`` prints: every key camelCase, ``formatVersion`` first."""
    document = PlanDocument(
        format_version=FORMAT_VERSION, infinization_version=version, timestamp=timestamp,
        manifest_dir=plan.manifest_dir, state_dir=plan.state_dir, desired_digest=plan.desired_digest,
        observed_digest=plan.observed_digest, allow_restart=plan.allow_restart,
        prune_other_sources=plan.prune_other_sources,
        applyable=any(change.steps for change in plan.changes), errored=bool(plan.refused),
        complete=not (plan.refused or plan.pending or any(c.unplug_pending for c in plan.changes)),
        summary=summary(plan), changes=[_change(change) for change in plan.changes])
    return document.model_dump(mode="json", by_alias=True)


def invalid_document(diagnostics: list[Diagnostic], *, version: str, timestamp: str,
                     manifest_dir: str) -> dict[str, Any]:
    """The document for a directory whose manifests fail: diagnostics and no changes."""
    document = PlanDocument(format_version=FORMAT_VERSION, infinization_version=version, timestamp=timestamp,
                            manifest_dir=manifest_dir, applyable=False, errored=True, complete=False,
                            diagnostics=diagnostics)
    return document.model_dump(mode="json", by_alias=True)


def plan_document_schema() -> dict[str, Any]:
    """The JSON Schema of the document (``infinization schema plan``), from the same models."""
    schema = _open(PlanDocument.model_json_schema(by_alias=True, mode="serialization"))
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://infinization.io/schemas/plan/v2.schema.json", **schema}


def _open(schema: Any) -> Any:
    """The schema without ``additionalProperties: false``: a later version of format 2 may add keys (the
    compatibility promise), and a consumer's validation must not fail on them."""
    if isinstance(schema, dict):
        return {k: _open(v) for k, v in schema.items() if not (k == "additionalProperties" and v is False)}
    if isinstance(schema, list):
        return [_open(item) for item in schema]
    return schema


class PlanFormatError(ValueError):
    """A saved plan this version cannot apply (another format, or not a plan at all)."""


def plan_from_document(data: Any) -> Plan:
    """The ``Plan`` inside a saved document (``apply PLANFILE``); only the same format version is read."""
    if not isinstance(data, dict) or "formatVersion" not in data:
        raise PlanFormatError("not a saved plan (no formatVersion); save one with `infinization plan --out`")
    if data["formatVersion"] != FORMAT_VERSION:
        raise PlanFormatError(f"plan format {data['formatVersion']!r} is not {FORMAT_VERSION}; plan again")
    try:
        document = PlanDocument.model_validate(data)
        if document.diagnostics or document.state_dir is None:
            raise PlanFormatError("the saved plan has manifest errors and nothing to apply")
        changes = [Change.model_validate({
            "resource": c.resource, "name": c.name, "action": c.action, "reasons": c.reasons, "fields": c.fields,
            "steps": [step.model_dump(mode="json", by_alias=True, exclude={"destroys_data"}) for step in c.steps],
            "pendingRestart": [r.message for r in c.pending_restart],
            "refusals": [r.message for r in c.refusals], "unplugPending": c.unplug_pending, "opens": c.opens,
            "source": c.source, "kept": c.kept,
        }) for c in document.changes]
        return Plan(manifest_dir=document.manifest_dir, state_dir=document.state_dir,
                    desired_digest=document.desired_digest or "", observed_digest=document.observed_digest or "",
                    allow_restart=document.allow_restart, prune_other_sources=document.prune_other_sources,
                    changes=changes)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise PlanFormatError(f"not a valid saved plan: {exc.error_count()} error(s), first at {where}: "
                              f"{first['msg']}") from exc
