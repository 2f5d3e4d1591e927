"""Atomic writes of the reconciler's own files (records) in the state directory."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from reconciler.observe import processes
from reconciler.observe.records import LaunchRecord, LiveRecord, read_live, read_record
from reconciler.plan.observed import AppliedRecord
from reconciler.spec.layout import VMPaths
from reconciler.spec.models import VirtualMachine


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file, fsync and rename: a crash leaves the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _dump(model: BaseModel) -> str:
    return model.model_dump_json(indent=2) + "\n"


def write_record(paths: VMPaths, vm: VirtualMachine, source: str | None, revision: str | None = None) -> AppliedRecord:
    """Record ``vm`` as last applied, keeping the list of disks we created."""
    current = read_record(paths.record)
    owned = current.owned_disks if current else []
    record = AppliedRecord(vm=vm, owned_disks=owned, source=source, revision=revision)
    write_atomic(paths.record, _dump(record))
    return record


def claim_disk(paths: VMPaths, disk: str) -> None:
    """Note in the record that we are about to create ``disk`` (written before the file exists)."""
    current = read_record(paths.record)
    if current is None:
        raise RuntimeError(f"no record for {paths.dir.name}: the record step must run first")
    if disk not in current.owned_disks:
        updated = current.model_copy(update={"owned_disks": sorted([*current.owned_disks, disk])})
        write_atomic(paths.record, _dump(updated))


def write_launch(paths: VMPaths, argv: list[str], vm: VirtualMachine) -> None:
    write_atomic(paths.launch, _dump(LaunchRecord(argv=argv, vm=vm)))


def update_live(paths: VMPaths, **changes: Any) -> None:
    """Change live.json for the QEMU that runs now (a record for an older process is replaced)."""
    process = processes.find_qemu(paths.pidfile)
    if process is None:
        return
    current = read_live(paths.live, process.pid, process.start_time)
    merged = current.model_dump()
    for key, value in changes.items():
        if isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    write_atomic(paths.live, _dump(LiveRecord.model_validate(merged)))
