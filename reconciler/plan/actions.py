"""The plan as data: a closed set of actions, one change per resource, with reasons for people.

A ``Plan`` holds one ``Change`` per VM. The action says what happens to the VM as a whole; the steps say
how, in the order the executor runs them; ``reasons`` and ``fields`` are for people and never drive a
decision. Serialised by alias (camelCase, like manifests and ``status --json``), a ``Plan`` is the core of
the published document of ``plan.document`` (versioned by ``FORMAT_VERSION``, see docs/plan-format.md)
that ``plan --json`` prints, ``plan --out`` saves and ``apply PLANFILE`` reads back.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from reconciler.plan.steps import Step

FORMAT_VERSION = 2  # 2: camelCase keys, the document's envelope (1 had snake_case keys)


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    RESTART = "restart"
    DELETE = "delete"
    NOOP = "no-op"

    @property
    def symbol(self) -> str:
        return {"create": "+", "update": "~", "restart": "-/+", "delete": "-", "no-op": " "}[self.value]


class Mode(StrEnum):
    """How a change to one field reaches the VM."""

    LIVE = "live"
    RESTART = "restart"
    REFUSED = "refused"


class _Data(BaseModel):
    # Built on first validation or dump, not at import: a Change's schema holds every step kind's, and the
    # planner makes changes without validating them again (``Change.planned``), so `plan` and `status`
    # never build it unless they print JSON (see docs/performance.md).
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True,
                              defer_build=True)


Resource = Literal["VirtualMachine", "Network", "Firewall"]


class FieldChange(_Data):
    path: str
    before: Any = None
    after: Any = None
    mode: Mode
    how: str
    drift: bool = Field(default=False, description="The manifest did not change this part since it was last "
                        "applied: the host drifted from it (changed outside the reconciler).")


class Change(_Data):
    resource: Resource = "VirtualMachine"
    name: str
    action: Action
    reasons: list[str] = Field(default_factory=list)
    fields: list[FieldChange] = Field(default_factory=list)
    steps: list[Step] = Field(default_factory=list)
    pending_restart: list[str] = Field(
        default_factory=list, description="Causes of a restart that is needed but not allowed yet."
    )
    refusals: list[str] = Field(default_factory=list, description="Why this VM's change cannot be applied.")
    unplug_pending: list[str] = Field(
        default_factory=list, description="Devices whose unplug the guest has not completed yet."
    )
    opens: list[str] = Field(
        default_factory=list,
        description="Host paths the steps make QEMU or qemu-img open: 'field path' ('-> resolved' via a symlink).",
    )
    source: str | None = Field(default=None, description="The manifest file the VM was last applied from "
                               "(for a VM missing from the manifests).")
    kept: str | None = Field(default=None, description="Why a VM missing from the manifests is kept, not "
                             "deleted (applied from another directory).")

    @classmethod
    def planned(cls, *, name: str, action: Action, resource: Resource = "VirtualMachine",
                reasons: Sequence[str] = (), fields: Sequence[FieldChange] = (), steps: Sequence[Step] = (),
                pending_restart: Sequence[str] = (), refusals: Sequence[str] = (), unplug_pending: Sequence[str] = (),
                opens: Sequence[str] = (), source: str | None = None, kept: str | None = None) -> Change:
        """A change the planner made: every argument is typed (the planner is mypy strict) and every step
        and field change in it was validated when it was made, so it is not validated again. Validating
        would build the schema of every step kind (about a sixth of `plan`'s start-up) even for a plan
        without steps. Anything read from outside (a saved plan) goes through ``model_validate``."""
        return cls.model_construct(resource=resource, name=name, action=action, reasons=list(reasons),
                                   fields=list(fields), steps=list(steps), pending_restart=list(pending_restart),
                                   refusals=list(refusals), unplug_pending=list(unplug_pending), opens=list(opens),
                                   source=source, kept=kept)

    @property
    def drifted(self) -> bool:
        """The host moved away from a manifest that did not (all) change: steps that repair a resource that
        exists already, with a drifted field, or with no manifest change at all (a QEMU that died, a TAP
        deleted by hand). The one definition (``plan --json``'s ``summary.drift`` and the daemon's
        ``infinization_drift_detected_total`` use it)."""
        if not self.steps or self.action in (Action.CREATE, Action.DELETE):
            return False
        return any(f.drift for f in self.fields) or all(f.drift for f in self.fields)

    @property
    def in_sync(self) -> bool:
        """Nothing to do, nothing pending, nothing refused: this resource matches its manifest. The one
        definition of "in sync" (``status``, the daemon's Ready condition and ``Plan.empty`` use it)."""
        return not (self.steps or self.pending_restart or self.refusals or self.unplug_pending)


class Plan(_Data):
    format_version: int = FORMAT_VERSION
    manifest_dir: str
    state_dir: str
    desired_digest: str
    observed_digest: str
    allow_restart: bool = False
    prune_other_sources: bool = False
    changes: list[Change] = Field(default_factory=list)

    @classmethod
    def planned(cls, *, manifest_dir: str, state_dir: str, desired_digest: str, observed_digest: str,
                allow_restart: bool, prune_other_sources: bool, changes: Sequence[Change]) -> Plan:
        """The planner's plan, not validated again (see ``Change.planned``)."""
        return cls.model_construct(format_version=FORMAT_VERSION, manifest_dir=manifest_dir, state_dir=state_dir,
                                   desired_digest=desired_digest, observed_digest=observed_digest,
                                   allow_restart=allow_restart, prune_other_sources=prune_other_sources,
                                   changes=list(changes))

    def counts(self) -> dict[Action, int]:
        counts = dict.fromkeys(Action, 0)
        for change in self.changes:
            if change.steps:
                counts[change.action] += 1
        return counts

    @property
    def refused(self) -> list[Change]:
        return [change for change in self.changes if change.refusals]

    @property
    def pending(self) -> list[Change]:
        return [change for change in self.changes if change.pending_restart]

    @property
    def empty(self) -> bool:
        """No step to run, nothing pending and nothing refused: the host matches the manifests."""
        return all(change.in_sync for change in self.changes)

    def change(self, name: str) -> Change | None:
        return next((change for change in self.changes if change.name == name), None)
