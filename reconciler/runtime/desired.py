"""The desired state to act on, and the one rule for a manifest file that fails: keep its last good spec.

A broken file must never read as "delete these VMs". ``keep_last_good`` takes what was just read and the
previous good desired state (the sync daemon's cache, or, for the CLI and a daemon that just started, the
last-applied records: ``from_records``) and keeps, for every VM of a file that failed, its previous spec.
Used by the CLI (``status``) and the sync daemon's desired-state cache, so both decide the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.spec.loader import LoadedVM, ManifestSet, Source
from reconciler.state.models import AppliedRecord


def _absolute(file: str) -> str:
    return str(Path(file).absolute()) if file else ""


@dataclass(frozen=True)
class DesiredVMs:
    vms: dict[str, LoadedVM] = field(default_factory=dict)
    invalid: dict[str, list[str]] = field(default_factory=dict)  # VM -> the errors of its file, while kept


def from_records(records: Mapping[str, AppliedRecord]) -> dict[str, LoadedVM]:
    """The last-applied records as a desired state (the file each came from, when known, made absolute)."""
    return {name: LoadedVM(record.vm, Source(_absolute(record.source or ""), 1)) for name, record in records.items()}


def keep_last_good(manifests: ManifestSet, previous: Mapping[str, LoadedVM]) -> DesiredVMs:
    """VMs read from files that loaded cleanly, plus, for each VM of ``previous`` whose file failed, its
    previous spec (with that file's errors). A VM of unknown origin is kept while any file fails."""
    failed = {_absolute(file) for file in manifests.failed_files}

    def broken(file: str) -> bool:
        return _absolute(file) in failed or (not file and bool(failed))

    vms = {name: loaded for name, loaded in manifests.vms.items() if not broken(loaded.source.file)}
    invalid: dict[str, list[str]] = {}
    for name, loaded in previous.items():
        if name not in vms and broken(loaded.source.file):
            vms[name] = loaded
            invalid[name] = [str(error) for error in manifests.errors
                             if _absolute(error.file) == _absolute(loaded.source.file)
                             or (not loaded.source.file and _absolute(error.file) in failed)]
    return DesiredVMs(vms=vms, invalid=invalid)
