"""The status store: an embedded SQLite database under the state directory, optionally mirrored to
PostgreSQL for a platform's backend.

The sync daemon writes a row per VM (phase, PID, revision, conditions, last reconcile and its timing) and
an event per action; ``infinization status`` and ``infinization events`` read them, also while the
daemon runs (SQLite in WAL mode: readers never block the writer). The PostgreSQL mirror receives the same
rows from a background thread (``_Mirror``), so a slow or unreachable server never holds up a reconcile:
writes queue up and are sent in order once it answers (the local store is the source of truth).
The database and its -wal/-shm files are 0600: statuses and events are root's to read.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from reconciler.runtime.dsn import redact
from reconciler.state.files import make_private_dirs

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
        make_private_dirs(path.parent)
        _make_private(path)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        for statement in SCHEMA:
            self._db.execute(statement)
        self._mirror = _Mirror(database_url) if database_url else None

    def event(self, vm: str, kind: str, result: str, message: str, duration_ms: float | None = None) -> None:
        row = (time.time(), self.host, vm, kind, result, redact(message), duration_ms)
        self._db.execute("INSERT INTO events (ts, host, vm, kind, result, message, duration_ms) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", row)
        self._send("INSERT INTO infinization_events (ts, host, vm, kind, result, message, duration_ms) "
                     "VALUES (%s, %s, %s, %s, %s, %s, %s)", row)

    def set_status(self, status: VMStatus) -> None:
        conditions = json.dumps({kind: redact(text) for kind, text in status.conditions.items()}, sort_keys=True)
        row = (self.host, status.vm, status.phase, status.pid, status.revision, conditions,
               status.last_reconcile, status.duration_ms, status.result)
        self._db.execute(
            "INSERT INTO vm_status (host, vm, phase, pid, revision, conditions, last_reconcile, duration_ms, result) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (host, vm) DO UPDATE SET phase=excluded.phase, "
            "pid=excluded.pid, revision=excluded.revision, conditions=excluded.conditions, "
            "last_reconcile=excluded.last_reconcile, duration_ms=excluded.duration_ms, result=excluded.result", row)
        self._send(
            "INSERT INTO infinization_vm_status (host, vm, phase, pid, revision, conditions, last_reconcile, "
            "duration_ms, result) VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s) ON CONFLICT (host, vm) DO "
            "UPDATE SET phase=excluded.phase, pid=excluded.pid, revision=excluded.revision, "
            "conditions=excluded.conditions, last_reconcile=excluded.last_reconcile, "
            "duration_ms=excluded.duration_ms, result=excluded.result", row)

    def forget(self, vm: str) -> None:
        self._db.execute("DELETE FROM vm_status WHERE host = ? AND vm = ?", (self.host, vm))
        self._send("DELETE FROM infinization_vm_status WHERE host = %s AND vm = %s", (self.host, vm))

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

    def _send(self, sql: str, params: tuple[Any, ...]) -> None:
        if self._mirror is not None:
            self._mirror.send(sql, params)

    def close(self) -> None:
        self._db.close()
        if self._mirror is not None:
            self._mirror.close()


class _Mirror:
    """Writes to PostgreSQL from its own thread, in order, reconnecting with backoff while it is down."""

    LIMIT = 10_000  # queued writes kept while the server is down; past that the newest are dropped

    def __init__(self, url: str) -> None:
        self.url = url
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue(self.LIMIT)
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="postgresql-mirror", daemon=True)
        self._thread.start()

    def send(self, sql: str, params: tuple[Any, ...]) -> None:
        try:
            self._queue.put_nowait((sql, params))
        except queue.Full:
            self._dropped += 1
            if self._dropped % 1000 == 1:
                log.warning("postgresql mirror is behind; dropping writes", dropped=self._dropped)

    def close(self, flush_seconds: float = 5.0) -> None:
        """Send what is queued (for a while at most), then stop."""
        try:
            self._queue.put(None, timeout=flush_seconds)
        except queue.Full:
            return
        self._thread.join(flush_seconds)

    def _connect(self) -> Any:
        import psycopg

        connection = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        for statement in PG_SCHEMA:
            connection.execute(statement)
        return connection

    def _run(self) -> None:
        import psycopg

        connection: Any = None
        delay = 0.5
        item = self._queue.get()
        while item is not None:
            try:
                if connection is None:
                    connection = self._connect()
                connection.execute(*item)
            except psycopg.OperationalError as exc:  # the server or the link: retry the same write later
                log.warning("postgresql mirror unavailable; retrying", error=str(exc), retry_seconds=delay)
                if connection is not None:
                    connection.close()
                connection = None
                time.sleep(delay)  # this thread's own wait: the daemon does not notice it
                delay = min(30.0, delay * 2)
                continue  # the same write again, so rows arrive in order
            except psycopg.Error as exc:  # this write itself is wrong: retrying would never end
                log.warning("postgresql mirror write refused", error=str(exc))
            delay = 0.5
            item = self._queue.get()
        if connection is not None:
            connection.close()


def _make_private(path: Path) -> None:
    """The database and its WAL and shared-memory files: 0600 (SQLite gives new -wal/-shm files the
    database's mode), created so before SQLite opens it."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(file.lstat().st_mode) & 0o077:
                os.chmod(file, 0o600)


def open_readonly(path: Path, host: str = "") -> Store | None:
    return Store(path, host) if path.exists() else None


def conditions_text(conditions: dict[str, str]) -> Iterable[str]:
    return (f"{kind}: {message}" if message else kind for kind, message in sorted(conditions.items()))
