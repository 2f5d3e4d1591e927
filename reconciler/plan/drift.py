"""Which of a VM's field changes are drift: the host moved away from a manifest that did not change.

A plan's field changes mix two stories an operator reads differently: "you changed the manifest" and
"something changed the host behind our back" (a device removed over a second monitor, a disk grown by hand,
a TAP moved to another bridge). The planner knows the last applied manifest (the record): a field change is
drift when its part of the spec (the top-level field, or the named disk, NIC, CD-ROM or channel) is the same
in the record and in the manifest, and it does not remove something (a removal follows a manifest: this VM's,
or a Network's it used). A VM without a record has no drift (everything is new). Pure; called by
``plan.planner`` once a VM's field changes are known.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from reconciler.plan.actions import FieldChange

_PART = re.compile(r"^([A-Za-z]+(?:\[[^\]]*\])?)")


def part(path: str) -> str:
    """``disks[root].size`` -> ``disks[root]``; ``memory.size`` -> ``memory``."""
    match = _PART.match(path)
    return match.group(1) if match else path


def mark(fields: list[FieldChange], manifest_changes: Iterable[str] | None) -> list[FieldChange]:
    """The same field changes, with ``drift`` set on those whose part of the manifest did not change.

    ``manifest_changes``: the dotted paths that differ between the record and the manifest (None: no
    record, nothing is drift)."""
    if manifest_changes is None:
        return fields
    changed = {part(path) for path in manifest_changes}
    # A change towards nothing (``after`` None) removes what a manifest no longer has, this VM's or a
    # Network's it used: a manifest change, whatever the VM's own manifest says.
    return [field if part(field.path) in changed or field.after is None else field.model_copy(update={"drift": True})
            for field in fields]
