"""The sync daemon's view of the last-applied records: each record.json parsed again only when it changed.

Every reconcile needs every VM's record (derived MACs are resolved across all VMs, the planner sees the
whole host), and parsing them all (JSON and pydantic, for each VM) made a reconcile of one VM grow with
the host's VM count. ``RecordCache`` keeps each parsed record with the file's identity
(``state.files.record_identity``: inode, mtime, ctime, size) and re-parses a record only when that
changed: the executor replaces a record by rename (a new inode) and a hand edit moves its mtime and ctime.
The identity is taken before the read, so a record replaced during it is read again next time. The
periodic resync calls ``forget`` and reads everything. Used by ``runtime.cache.DesiredCache.records``.
"""

from __future__ import annotations

from reconciler.errors import CorruptRecord
from reconciler.state import files
from reconciler.state.layout import StateLayout
from reconciler.state.models import AppliedRecord

Identity = tuple[int, int, int, int]


class RecordCache:
    def __init__(self, layout: StateLayout) -> None:
        self.layout = layout
        self._kept: dict[str, tuple[Identity, AppliedRecord | str]] = {}  # a str: why it is corrupt

    def forget(self) -> None:
        self._kept.clear()

    def read(self, corrupt: dict[str, str]) -> dict[str, AppliedRecord]:
        """Every VM's last-applied record; corrupt ones are left out, their error put in ``corrupt`` (as
        ``state.files.read_records`` does)."""
        records: dict[str, AppliedRecord] = {}
        kept: dict[str, tuple[Identity, AppliedRecord | str]] = {}
        for name in files.known_vm_names(self.layout):
            paths = self.layout.vm(name)
            identity = files.record_identity(paths)
            if identity is None:
                continue
            previous = self._kept.get(name)
            value: AppliedRecord | str | None
            if previous is not None and previous[0] == identity:
                value = previous[1]
            else:
                try:
                    value = files.read_record(paths)
                except CorruptRecord as exc:
                    value = str(exc)
                if value is None:  # removed between the two looks
                    continue
            kept[name] = (identity, value)
            if isinstance(value, str):
                corrupt[name] = value
            else:
                records[name] = value
        self._kept = kept
        return records
