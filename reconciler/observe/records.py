"""The reconciler's own files in the state directory: last-applied records and launch records.

``record.json`` is written by the executor before it changes anything for a VM (it is our claim on the VM
and on the disks we create); ``launch.json`` holds the argv and spec of the QEMU we started, and is only
trusted while the live process's /proc cmdline equals that argv. This module reads them and defines their
format; ``apply.files`` writes them atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reconciler.plan.observed import AppliedRecord, NetworkRecord
from reconciler.spec.layout import StateLayout
from reconciler.spec.models import VirtualMachine

RECORD_VERSION = 1


class LaunchRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = RECORD_VERSION
    argv: list[str]
    vm: VirtualMachine


class LiveRecord(BaseModel):
    """What QMP cannot tell us back (link state, balloon target, unplugs we asked for), for one QEMU.

    Valid only for the process it names: a restarted QEMU starts with links up, no balloon target and no
    pending unplug, so a record for another pid/start time is ignored.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    pid: int
    start_time: int
    links: dict[str, str] = Field(default_factory=dict)
    balloon_target: int | None = None
    unplugs: list[str] = Field(default_factory=list)


def read_live(path: Path, pid: int, start_time: int) -> LiveRecord:
    try:
        record = LiveRecord.model_validate_json(path.read_text())
    except (FileNotFoundError, ValidationError, json.JSONDecodeError):
        record = None
    if record is None or (record.pid, record.start_time) != (pid, start_time):
        return LiveRecord(pid=pid, start_time=start_time)
    return record


class CorruptRecord(Exception):
    """A record file exists but cannot be read; the VM is left alone until a person looks."""


def read_record(path: Path) -> AppliedRecord | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return AppliedRecord.model_validate_json(text)
    except ValidationError as exc:
        raise CorruptRecord(f"{path}: {exc}") from exc


def read_launch(path: Path) -> LaunchRecord | None:
    try:
        return LaunchRecord.model_validate_json(path.read_text())
    except (FileNotFoundError, ValidationError, json.JSONDecodeError):
        return None


def known_vm_names(layout: StateLayout) -> list[str]:
    """VM folders in the state directory (ours by construction: only the executor creates them)."""
    if not layout.vms.is_dir():
        return []
    return sorted(entry.name for entry in layout.vms.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def read_network_records(layout: StateLayout) -> dict[str, NetworkRecord]:
    records = {}
    if layout.networks.is_dir():
        for path in sorted(layout.networks.glob("*.json")):
            try:
                records[path.stem] = NetworkRecord.model_validate_json(path.read_text())
            except ValidationError as exc:
                raise CorruptRecord(f"{path}: {exc}") from exc
    return records


def read_records(layout: StateLayout, corrupt: dict[str, str] | None = None) -> dict[str, AppliedRecord]:
    """Every VM's last-applied record. A corrupt one raises CorruptRecord, unless ``corrupt`` is given: then
    it is left out and its error put there (the sync daemon: one bad file must not stall every VM)."""
    records = {}
    for name in known_vm_names(layout):
        try:
            record = read_record(layout.vm(name).record)
        except CorruptRecord as exc:
            if corrupt is None:
                raise
            corrupt[name] = str(exc)
            continue
        if record is not None:
            records[name] = record
    return records


def read_exit(path: Path) -> str | None:
    """The reason the VM's last QEMU ended (guest-shutdown, crash, guest-panicked...), if recorded."""
    try:
        return str(json.loads(path.read_text())["reason"])
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None
