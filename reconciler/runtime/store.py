"""The status store: an embedded SQLite database under the state directory, optionally mirrored to
PostgreSQL for a platform's backend.

The sync daemon writes a row per VM (phase, PID, revision, conditions, last reconcile and its timing) and
an event per action; ``infinization status`` and ``infinization events`` read them, also while the
daemon runs (SQLite in WAL mode: readers never block the writer). The PostgreSQL mirror receives the same
rows; if it is unreachable the daemon logs it and goes on (the local store is the source of truth).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("infinization.store")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, host TEXT NOT NULL, vm TEXT NOT NULL,
        kind TEXT NOT NULL, result TEXT NOT NULL, message TEXT NOT NULL, duration_ms REAL)""",
    "CREATE INDEX IF NOT EXISTS events_vm ON events (vm, id)",
    """CREATE TABLE IF NOT EXISTS vm_status (
        host TEXT NOT NULL, vm TEXT NOT NULL, phase TEXT NOT NULL, pid INTEGER, revision TEXT,
        conditions TEXT NOT NULL, last_reconcile REAL, duration_ms REAL, result TEXT,
        PRIMARY KEY (host, vm))""",
]
PG_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS infinization_events (
        id BIGSERIAL PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, host TEXT NOT NULL, vm TEXT NOT NULL,
        kind TEXT NOT NULL, result TEXT NOT NULL, message TEXT NOT NULL, duration_ms DOUBLE PRECISION)""",
    """CREATE TABLE IF NOT EXISTS infinization_vm_status (
        host TEXT NOT NULL, vm TEXT NOT NULL, phase TEXT NOT NULL, pid INTEGER, revision TEXT,
        conditions JSONB NOT NULL, last_reconcile DOUBLE PRECISION, duration_ms DOUBLE PRECISION, result TEXT,
        PRIMARY KEY (host, vm))""",
]


@dataclass
class VMStatus:
    vm: str
    phase: str
    pid: int | None = None
    revision: str | None = None
    conditions: dict[str, str] = field(default_factory=dict)  # type -> message ("" when fine)
    last_reconcile: float | None = None
    duration_ms: float | None = None
    result: str | None = None


class Store:
    def __init__(self, path: Path, host: str = "", database_url: str | None = None) -> None:
        self.path = path
        self.host = host
        self.database_url = database_url
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        for statement in SCHEMA:
            self._db.execute(statement)
        self._pg: Any = None
        if database_url:
            self._connect_pg()

    def _connect_pg(self) -> None:
        import psycopg

        try:
            self._pg = psycopg.connect(str(self.database_url), autocommit=True, connect_timeout=5)
            for statement in PG_SCHEMA:
                self._pg.execute(statement)
        except psycopg.Error as exc:
            log.warning("postgresql mirror unavailable", error=str(exc))
            self._pg = None

    def _mirror(self, sql: str, params: tuple[Any, ...]) -> None:
        if not self.database_url:
            return
        if self._pg is None:
            self._connect_pg()
        if self._pg is None:
            return
        import psycopg

        try:
            self._pg.execute(sql, params)
        except psycopg.Error as exc:
            log.warning("postgresql mirror write failed", error=str(exc))
            self._pg = None

    def event(self, vm: str, kind: str, result: str, message: str, duration_ms: float | None = None) -> None:
        row = (time.time(), self.host, vm, kind, result, message, duration_ms)
        self._db.execute("INSERT INTO events (ts, host, vm, kind, result, message, duration_ms) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", row)
        self._mirror("INSERT INTO infinization_events (ts, host, vm, kind, result, message, duration_ms) "
                     "VALUES (%s, %s, %s, %s, %s, %s, %s)", row)

    def set_status(self, status: VMStatus) -> None:
        conditions = json.dumps(status.conditions, sort_keys=True)
        row = (self.host, status.vm, status.phase, status.pid, status.revision, conditions,
               status.last_reconcile, status.duration_ms, status.result)
        self._db.execute(
            "INSERT INTO vm_status (host, vm, phase, pid, revision, conditions, last_reconcile, duration_ms, result) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (host, vm) DO UPDATE SET phase=excluded.phase, "
            "pid=excluded.pid, revision=excluded.revision, conditions=excluded.conditions, "
            "last_reconcile=excluded.last_reconcile, duration_ms=excluded.duration_ms, result=excluded.result", row)
        self._mirror(
            "INSERT INTO infinization_vm_status (host, vm, phase, pid, revision, conditions, last_reconcile, "
            "duration_ms, result) VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s) ON CONFLICT (host, vm) DO "
            "UPDATE SET phase=excluded.phase, pid=excluded.pid, revision=excluded.revision, "
            "conditions=excluded.conditions, last_reconcile=excluded.last_reconcile, "
            "duration_ms=excluded.duration_ms, result=excluded.result", row)

    def forget(self, vm: str) -> None:
        self._db.execute("DELETE FROM vm_status WHERE host = ? AND vm = ?", (self.host, vm))
        self._mirror("DELETE FROM infinization_vm_status WHERE host = %s AND vm = %s", (self.host, vm))

    def statuses(self) -> dict[str, VMStatus]:
        rows = self._db.execute("SELECT vm, phase, pid, revision, conditions, last_reconcile, duration_ms, result "
                                "FROM vm_status WHERE host = ?", (self.host,)).fetchall()
        return {r[0]: VMStatus(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7]) for r in rows}

    def events(self, vm: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        sql = "SELECT ts, vm, kind, result, message, duration_ms FROM events WHERE host = ?"
        params: list[Any] = [self.host]
        if vm:
            sql += " AND vm = ?"
            params.append(vm)
        rows = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", (*params, limit)).fetchall()
        keys = ("ts", "vm", "kind", "result", "message", "duration_ms")
        return [dict(zip(keys, row, strict=True)) for row in reversed(rows)]

    def close(self) -> None:
        self._db.close()
        if self._pg is not None:
            self._pg.close()


def open_readonly(path: Path, host: str = "") -> Store | None:
    return Store(path, host) if path.exists() else None


def conditions_text(conditions: dict[str, str]) -> Iterable[str]:
    return (f"{kind}: {message}" if message else kind for kind, message in sorted(conditions.items()))
