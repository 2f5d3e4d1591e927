"""The published JSON form of an apply run (``apply --json``): the plan apply carried out, every step it
ran with its result, and what a re-plan found afterwards.

It is the machine-readable record of what ``apply`` did, beside the plan document of ``plan.document``
(same ``formatVersion``, same compatibility promise, documented in ``docs/plan-format.md``; its schema is
``infinization schema apply``). A CI job or a test compares ``executed`` with the steps a ``plan --json``
showed: same steps, same resources, same order within a resource. Steps of different VMs run side by side
(``apply.scheduler``), so ``executed`` lists them in the order they ended; within one resource the order is
the plan's.

Pure: the executor's results are passed in (anything with the attributes of ``apply.executor.StepResult``),
the version and timestamp are arguments. Called by ``cli.plan_apply``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

from pydantic import Field

from reconciler.plan.actions import FORMAT_VERSION, Plan
from reconciler.plan.document import PlanDocument, PublishedStep, Summary, _Doc, _open, plan_document, summary
from reconciler.plan.steps import Step


class StepOutcome(Protocol):
    """What the executor reports for one step (``apply.executor.StepResult`` has these)."""

    @property
    def step(self) -> Step: ...
    @property
    def ok(self) -> bool: ...
    @property
    def ran(self) -> bool: ...
    @property
    def detail(self) -> str: ...
    @property
    def seconds(self) -> float: ...
    @property
    def permanent(self) -> bool: ...


class ExecutedStep(PublishedStep):
    """One step apply began, as the plan document publishes a step, with its result."""

    result: Literal["ok", "failed", "skipped"] = Field(
        description="ok: done; failed: the step ran and failed (the resource's later steps did not run); "
        "skipped: not run at all (an earlier host-wide change failed: fail-closed).")
    detail: str = Field(description="What the step did or why it failed, for people.")
    duration_ms: float
    permanent: bool = Field(description="The failure needs a person: retrying cannot help.")


class Failure(_Doc):
    name: str = Field(description="The resource (VM, Network, firewall) whose change stopped.")
    message: str
    permanent: bool


class After(_Doc):
    """What a re-plan right after the run found."""

    converged: bool = Field(description="The re-plan has no step left to run.")
    applyable: bool = Field(description="The re-plan would run at least one step (not converged).")
    complete: bool = Field(description="The host matches every manifest: nothing refused, pending or left.")
    errored: bool = Field(description="Some change is refused.")
    summary: Summary


class ApplyDocument(_Doc):
    """What ``apply --json`` prints (docs/plan-format.md, "The apply document")."""

    format_version: int = Field(description="The plan format's version: bumped on any incompatible change.")
    infinization_version: str
    timestamp: str = Field(description="When the run ended, RFC 3339 UTC.")
    plan: PlanDocument = Field(description="The plan apply carried out, as `plan --json` prints it.")
    executed: list[ExecutedStep] = Field(description="Every step apply began, in the order they ended; "
                                         "within one resource, the plan's order.")
    failed: list[Failure] = Field(description="Resources whose change stopped at a failed step.")
    ok: bool = Field(description="No step failed.")
    after: After | None = Field(default=None, description="The re-plan after the run (absent when apply ran "
                                "nothing).")


def _executed(outcome: StepOutcome) -> ExecutedStep:
    step = outcome.step
    result: Literal["ok", "failed", "skipped"] = "ok" if outcome.ok else "failed" if outcome.ran else "skipped"
    return ExecutedStep(kind=step.kind, name=step.name, target=step.target, summary=step.summary,
                        args=step.model_dump(mode="json", by_alias=True)["args"], destroys_data=step.destroys_data,
                        result=result, detail=outcome.detail, duration_ms=round(outcome.seconds * 1000, 1),
                        permanent=outcome.permanent)


def apply_document(plan: Plan, outcomes: Sequence[StepOutcome], failed: dict[str, str], permanent: set[str],
                   after: Plan | None, *, version: str, timestamp: str) -> dict[str, Any]:
    """The document ``apply --json`` prints: every key camelCase, ``formatVersion`` first."""
    shown = PlanDocument.model_validate(plan_document(plan, version=version, timestamp=timestamp))
    checked = None
    if after is not None:  # the same flags as the plan document's, from the same code
        again = PlanDocument.model_validate(plan_document(after, version=version, timestamp=timestamp))
        checked = After(converged=not again.applyable, applyable=again.applyable, complete=again.complete,
                        errored=again.errored, summary=again.summary or summary(after))
    document = ApplyDocument(
        format_version=FORMAT_VERSION, infinization_version=version, timestamp=timestamp, plan=shown,
        executed=[_executed(outcome) for outcome in outcomes],
        failed=[Failure(name=name, message=why, permanent=name in permanent) for name, why in failed.items()],
        ok=not failed, after=checked)
    return document.model_dump(mode="json", by_alias=True)


def apply_document_schema() -> dict[str, Any]:
    """The JSON Schema of the document (``infinization schema apply``), from the same models."""
    schema = _open(ApplyDocument.model_json_schema(by_alias=True, mode="serialization"))
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://infinization.io/schemas/apply/v2.schema.json", **schema}
