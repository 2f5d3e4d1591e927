"""The PostgreSQL mirror of the status store: its schema, forward migrations, retention and writer thread.

A platform's backend reads VM statuses and events of every host from one PostgreSQL database. The sync
daemon (and the CLI's start, stop and apply) write them here through ``Mirror``, from a thread of its own,
so a slow or unreachable server never holds up a reconcile: writes queue up and are sent in order once it
answers; the local SQLite store stays the source of truth.

The schema is versioned (``infinization_schema_version``) and moved forward by ``MIGRATIONS`` in one
transaction under an advisory lock, so hosts sharing the database upgrade it once and never half-way. A
database created before versioning (epoch-seconds columns, no table of versions) is version 0: migration 1
is idempotent on it and migration 2 converts it. A database newer than this code is left alone and the
mirror stops, with an error saying to upgrade. Each host prunes its own events older than the retention.

Documented for consumers in docs/architecture.md ("The sync daemon": the tables, their indexes and the
queries they serve). Called by ``runtime.store``.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from reconciler.runtime.lazylog import get_logger

log = get_logger("infinization.store")  # structlog, imported when it first logs (`status` never does)

# (version, what it does, statements). Append only: a released migration is never edited.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "events and VM status tables", [
        """CREATE TABLE IF NOT EXISTS infinization_events (
            id BIGSERIAL PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, host TEXT NOT NULL, vm TEXT NOT NULL,
            kind TEXT NOT NULL, result TEXT NOT NULL, message TEXT NOT NULL, duration_ms DOUBLE PRECISION)""",
        """CREATE TABLE IF NOT EXISTS infinization_vm_status (
            host TEXT NOT NULL, vm TEXT NOT NULL, phase TEXT NOT NULL, pid INTEGER, revision TEXT,
            conditions JSONB NOT NULL, last_reconcile DOUBLE PRECISION, duration_ms DOUBLE PRECISION, result TEXT,
            PRIMARY KEY (host, vm))""",
    ]),
    (2, "timestamptz times; indexes for a backend's queries", [
        "ALTER TABLE infinization_events ALTER COLUMN ts TYPE timestamptz USING to_timestamp(ts)",
        "ALTER TABLE infinization_vm_status ALTER COLUMN last_reconcile TYPE timestamptz "
        "USING to_timestamp(last_reconcile)",
        # One VM's (or one host's) latest events: WHERE host = $1 AND vm = $2 ORDER BY ts DESC LIMIT n.
        "CREATE INDEX IF NOT EXISTS infinization_events_host_vm_ts ON infinization_events (host, vm, ts DESC)",
        # Every host's events since a time (a dashboard's feed), and retention: WHERE ts < now() - interval.
        "CREATE INDEX IF NOT EXISTS infinization_events_ts ON infinization_events (ts)",
        # Every VM in a phase or not Ready across hosts: WHERE phase = 'Running' / conditions ? 'Failed'.
        "CREATE INDEX IF NOT EXISTS infinization_vm_status_phase ON infinization_vm_status (phase)",
        "CREATE INDEX IF NOT EXISTS infinization_vm_status_conditions ON infinization_vm_status "
        "USING gin (conditions)",
    ]),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
_LOCK_KEY = 0x696E667A  # "infz": the advisory lock every host's migration takes

INSERT_EVENT = ("INSERT INTO infinization_events (ts, host, vm, kind, result, message, duration_ms) "
                "VALUES (to_timestamp(%s), %s, %s, %s, %s, %s, %s)")
UPSERT_STATUS = (
    "INSERT INTO infinization_vm_status (host, vm, phase, pid, revision, conditions, last_reconcile, duration_ms, "
    "result) VALUES (%s, %s, %s, %s, %s, %s::jsonb, to_timestamp(%s), %s, %s) ON CONFLICT (host, vm) DO UPDATE "
    "SET phase=excluded.phase, pid=excluded.pid, revision=excluded.revision, conditions=excluded.conditions, "
    "last_reconcile=excluded.last_reconcile, duration_ms=excluded.duration_ms, result=excluded.result")
DELETE_STATUS = "DELETE FROM infinization_vm_status WHERE host = %s AND vm = %s"
PRUNE_EVENTS = "DELETE FROM infinization_events WHERE host = %s AND ts < now() - make_interval(days => %s)"


class SchemaTooNew(Exception):
    """The database was migrated by a newer Infinization: this one must not write to it."""


def migrate(connection: Any) -> int:
    """Bring the database to ``SCHEMA_VERSION``; return the version it had. One transaction, one host at a
    time (advisory lock), so a failure leaves the previous version whole."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        connection.execute("CREATE TABLE IF NOT EXISTS infinization_schema_version (version INTEGER PRIMARY KEY, "
                           "description TEXT NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        found = connection.execute("SELECT coalesce(max(version), 0) FROM infinization_schema_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(f"the PostgreSQL schema is version {found}, newer than this Infinization's "
                               f"{SCHEMA_VERSION}: upgrade Infinization on this host")
        for version, description, statements in MIGRATIONS:
            if version <= found:
                continue
            for statement in statements:
                connection.execute(statement)
            connection.execute("INSERT INTO infinization_schema_version (version, description) VALUES (%s, %s)",
                               (version, description))
            log.info("postgresql schema migrated", version=version, description=description)
        return int(found)


class Mirror:
    """Writes to PostgreSQL from its own thread, in order, reconnecting with backoff while it is down."""

    LIMIT = 10_000  # queued writes kept while the server is down; past that the newest are dropped
    PRUNE_EVERY = 3600.0  # seconds between retention passes

    def __init__(self, url: str, host: str, retention_days: int = 30) -> None:
        self.url = url
        self.host = host
        self.retention_days = retention_days
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue(self.LIMIT)
        self._dropped = 0
        self._pruned_at = 0.0
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
        migrate(connection)
        return connection

    def _prune(self, connection: Any) -> None:
        if self.retention_days > 0 and time.monotonic() - self._pruned_at > self.PRUNE_EVERY:
            connection.execute(PRUNE_EVENTS, (self.host, self.retention_days))
            self._pruned_at = time.monotonic()

    def _run(self) -> None:
        import psycopg

        connection: Any = None
        delay = 0.5
        item = self._queue.get()
        while item is not None:
            try:
                if connection is None:
                    connection = self._connect()
                self._prune(connection)
                connection.execute(*item)
            except SchemaTooNew as exc:
                log.error("postgresql mirror stopped", error=str(exc))
                return
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
