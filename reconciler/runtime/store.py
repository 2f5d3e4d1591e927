"""The status store: an embedded SQLite database under the state directory, optionally mirrored to
PostgreSQL for a platform's backend.

The sync daemon writes a row per VM (phase, PID, revision, conditions, last reconcile and its timing) and
an event per action; ``infinization status`` and ``infinization events`` read them, also while the
daemon runs (SQLite in WAL mode: readers never block the writer). The PostgreSQL mirror
(``runtime.pgmirror``: schema versions, migrations, retention) receives the same rows from a background
thread, so a slow or unreachable server never holds up a reconcile (the local store is the source of truth).
Rows are keyed by this host's name (``--host``, else the hostname); events older than the retention go.
The database and its -wal/-shm files are 0600: statuses and events are root's to read.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.runtime.dsn import redact
from reconciler.runtime.lazylog import get_logger
from reconciler.runtime.pgmirror import Mirror
from reconciler.state.files import make_private_dirs

log = get_logger("infinization.store")  # structlog, imported when it first logs (`status` never does)

SCHEMA = [  # version 1 (PRAGMA user_version); later versions in _LOCAL_MIGRATIONS
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, host TEXT NOT NULL, vm TEXT NOT NULL,
        kind TEXT NOT NULL, result TEXT NOT NULL, message TEXT NOT NULL, duration_ms REAL)""",
    "CREATE INDEX IF NOT EXISTS events_vm ON events (vm, id)",
    """CREATE TABLE IF NOT EXISTS vm_status (
        host TEXT NOT NULL, vm TEXT NOT NULL, phase TEXT NOT NULL, pid INTEGER, revision TEXT,
        conditions TEXT NOT NULL, last_reconcile REAL, duration_ms REAL, result TEXT,
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


# Forward migrations of the local database: (user_version, statements; "?" is this host's name).
_LOCAL_MIGRATIONS: list[tuple[int, list[str]]] = [
    # Rows written before the host name defaulted to the machine's hostname had an empty host.
    (2, ["UPDATE events SET host = ? WHERE host = ''", "UPDATE vm_status SET host = ? WHERE host = ''",
         "CREATE INDEX IF NOT EXISTS events_ts ON events (ts)"]),
]
RETENTION_DAYS = 30  # events older than this are pruned (sync --event-retention-days; 0 keeps them)


def store_host(host: str | None) -> str:
    """The name rows are written under: ``--host``, else this machine's hostname (never empty, so hosts
    sharing a PostgreSQL database never collide on a VM's name)."""
    return host or socket.gethostname()


class Store:
    def __init__(self, path: Path, host: str | None = None, database_url: str | None = None,
                 retention_days: int = RETENTION_DAYS) -> None:
        self.path = path
        self.host = store_host(host)
        self.database_url = database_url
        self.retention_days = retention_days
        make_private_dirs(path.parent)
        _make_private(path)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL's own recommendation: a commit is not fsynced (a checkpoint is), so the reconcile that writes
        # an event per step does not wait on the disk each time. The database stays consistent after a crash;
        # a power loss can cost the last events, which the daemon's log also has. VM state is in state files.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()
        self._pruned_at = 0.0
        self._write_error: str | None = None
        self._mirror = Mirror(database_url, self.host, retention_days, snapshot=self._snapshot) if database_url \
            else None

    def _migrate(self) -> None:
        for statement in SCHEMA:
            self._db.execute(statement)
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        for target, statements in _LOCAL_MIGRATIONS:
            if version >= target:
                continue
            self._db.execute("BEGIN IMMEDIATE")
            for statement in statements:
                self._db.execute(statement, (self.host,) if "?" in statement else ())
            self._db.execute(f"PRAGMA user_version = {int(target)}")
            self._db.execute("COMMIT")

    def _prune(self, now: float) -> None:
        """Drop this host's events past the retention, at most once an hour (the mirror prunes its own)."""
        if self.retention_days > 0 and now - self._pruned_at > 3600:
            self._write("DELETE FROM events WHERE host = ? AND ts < ?", (self.host, now - self.retention_days * 86400))
            self._pruned_at = now

    def event(self, vm: str, kind: str, result: str, message: str, duration_ms: float | None = None) -> None:
        row = self._row(vm, kind, result, message, duration_ms)
        if not self._insert_event(row):  # not lost: the daemon's log has it
            log.warning("event not stored", vm=vm, kind=kind, result=result, message=message)
        if self._mirror is not None:
            self._mirror.event(row)
            self._mirror_news()

    def _row(self, vm: str, kind: str, result: str, message: str, duration_ms: float | None) -> tuple[Any, ...]:
        now = time.time()
        self._prune(now)
        return (now, self.host, vm, kind, result, redact(message), duration_ms)

    def _insert_event(self, row: tuple[Any, ...]) -> bool:
        return self._write("INSERT INTO events (ts, host, vm, kind, result, message, duration_ms) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", row)

    def set_status(self, status: VMStatus) -> None:
        conditions = json.dumps({kind: redact(text) for kind, text in status.conditions.items()}, sort_keys=True)
        row = (self.host, status.vm, status.phase, status.pid, status.revision, conditions,
               status.last_reconcile, status.duration_ms, status.result)
        self._write(
            "INSERT INTO vm_status (host, vm, phase, pid, revision, conditions, last_reconcile, duration_ms, result) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (host, vm) DO UPDATE SET phase=excluded.phase, "
            "pid=excluded.pid, revision=excluded.revision, conditions=excluded.conditions, "
            "last_reconcile=excluded.last_reconcile, duration_ms=excluded.duration_ms, result=excluded.result", row)
        if self._mirror is not None:
            self._mirror.status(status.vm, row)
            self._mirror_news()

    def forget(self, vm: str) -> None:
        self._write("DELETE FROM vm_status WHERE host = ? AND vm = ?", (self.host, vm))
        if self._mirror is not None:
            self._mirror.status(vm, None)
            self._mirror_news()

    def _write(self, sql: str, params: tuple[Any, ...]) -> bool:
        """One write to the local store. A failed write (the state directory's file system is full, the disk
        fails) must not stop a reconcile: it is logged, with its error, once until writes work again."""
        try:
            self._db.execute(sql, params)
        except sqlite3.Error as exc:
            if self._write_error != str(exc):
                log.error("status store write failed", error=str(exc), database=str(self.path))
                self._write_error = str(exc)
            return False
        if self._write_error is not None:
            log.info("status store writes work again", database=str(self.path))
            self._write_error = None
        return True

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

    def _mirror_news(self) -> None:
        """An event when the PostgreSQL mirror went away or came back (seen at the next write: the daemon
        writes every VM's status at each resync), so `infinization events` says why the backend is stale.
        Told once it is stored: with the state directory's file system full it waits for the next write."""
        health = self._mirror.news() if self._mirror is not None else None
        if health is None or self._mirror is None:
            return
        if health.up:
            row = self._row("-", "status-mirror", "ok", "PostgreSQL answers again: every VM's status resent", None)
        else:
            row = self._row("-", "status-mirror", "failure", f"PostgreSQL status mirror unavailable: {health.error} "
                            "(statuses are kept and sent when it answers)", None)
        if self._insert_event(row):
            self._mirror.told(health)
            self._mirror.event(row)

    def _snapshot(self) -> list[tuple[Any, ...]]:
        """This host's status rows, read on the mirror's thread over a connection of its own (never the
        daemon's), as the mirror's UPSERT_STATUS parameters."""
        db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute("SELECT host, vm, phase, pid, revision, conditions, last_reconcile, duration_ms, result "
                              "FROM vm_status WHERE host = ?", (self.host,)).fetchall()
        finally:
            db.close()

    def close(self) -> None:
        self._db.close()
        if self._mirror is not None:
            self._mirror.close()


def _make_private(path: Path) -> None:
    """The database and its WAL and shared-memory files: 0600 (SQLite gives new -wal/-shm files the
    database's mode), created so before SQLite opens it."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(file.lstat().st_mode) & 0o077:
                os.chmod(file, 0o600)


def open_readonly(path: Path, host: str | None = None) -> Store | None:
    return Store(path, host) if path.exists() else None


def conditions_text(conditions: dict[str, str]) -> Iterable[str]:
    return (f"{kind}: {message}" if message else kind for kind, message in sorted(conditions.items()))
