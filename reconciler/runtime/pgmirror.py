"""The PostgreSQL mirror of the status store: its schema, forward migrations, retention and writer thread.

A platform's backend reads VM statuses and events of every host from one PostgreSQL database. The sync
daemon (and the CLI's start, stop and apply) write them here through ``Mirror``, from a thread of its own,
so a slow, stopped or unreachable server never holds up a reconcile: events queue up and are sent in order
once it answers, each VM's latest status waits (one per VM, never lost), and every reconnection first
makes this host's status rows equal to the local SQLite store's, which stays the source of truth. Whether
the server answers is in the metrics (``infinization_status_mirror_up``...) and, through the store, in the
events (``status-mirror``).

The schema is versioned (``infinization_schema_version``) and moved forward by ``MIGRATIONS`` in one
transaction under an advisory lock, so hosts sharing the database upgrade it once and never half-way. A
database created before versioning (epoch-seconds columns, no table of versions) is version 0: migration 1
is idempotent on it and migration 2 converts it. A database newer than this code is left alone and the
mirror stops, with an error saying to upgrade. Each host prunes its own events older than the retention.

Documented for consumers in docs/architecture.md ("The sync daemon": the tables, their indexes and the
queries they serve). Called by ``runtime.store``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
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
DELETE_OTHERS = "DELETE FROM infinization_vm_status WHERE host = %s AND NOT (vm = ANY(%s))"
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


@dataclass(frozen=True)
class Health:
    """What the mirror last found: whether PostgreSQL takes its writes, and why not."""

    up: bool
    error: str = ""


class Mirror:
    """Writes to PostgreSQL from its own thread, reconnecting with backoff while the server is down.

    Events are sent in order; at most ``LIMIT`` wait, past that new ones are dropped (and counted): the
    local store keeps them all. A VM's status is at most one pending write, its latest (a row or its
    deletion), so none is lost however long the server is away, and a server that comes back gets each
    VM's current row rather than its history. On every (re)connection this host's rows are first made
    equal to the local store's (``snapshot``): a row written or deleted while no mirror ran, or lost when
    a daemon stopped with the server down, is put right. The daemon never waits for any of it: the
    writers only append under a lock (``status``, ``event``); ``news`` tells the store when the
    server went away or came back, and the ``infinization_status_mirror_*`` metrics say the same.
    """

    LIMIT = 10_000  # events kept while the server is down; past that the newest are dropped
    PRUNE_EVERY = 3600.0  # seconds between retention passes
    RETRY_FIRST, RETRY_MAX = 0.5, 10.0  # reconnection backoff: how stale a recovered server's rows may stay
    PROBE_EVERY = 10.0  # an idle mirror asks the server this often, so its health does not wait for a write
    STATEMENT_TIMEOUT = "30s"  # one write that takes longer is cancelled (and retried): never a stuck thread
    # TCP settings unless the URL says otherwise: a server behind a broken link is given up on in ~30 s
    # instead of the kernel's ~15 minutes of retransmissions (libpq ignores them on UNIX sockets).
    TCP = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5", "keepalives_count": "3",
           "tcp_user_timeout": "30000"}

    def __init__(self, url: str, host: str, retention_days: int = 30,
                 snapshot: Callable[[], list[tuple[Any, ...]]] | None = None) -> None:
        self.url = url
        self.host = host
        self.retention_days = retention_days
        self._snapshot = snapshot  # this host's rows in the local store, as UPSERT_STATUS parameters
        self._lock = threading.Condition()
        self._events: deque[tuple[Any, ...]] = deque()
        self._statuses: dict[str, tuple[str, tuple[Any, ...]]] = {}  # VM -> its latest write
        self._closing = False
        self._dropped = 0
        self._health: Health | None = None  # None: no connection tried yet
        self._told: bool = True  # whether the store last reported the server up (it starts so)
        self._pruned_at = 0.0
        from reconciler.runtime import metrics  # prometheus_client: only a mirror pays for it (not `status`)

        self._metrics = metrics.status_mirror()
        self._thread = threading.Thread(target=self._run, name="postgresql-mirror", daemon=True)
        self._thread.start()

    # -- the writers' side (any thread; never blocks on the server) ------------------------------------------

    def event(self, row: tuple[Any, ...]) -> None:
        """Queue an event (INSERT_EVENT's parameters)."""
        with self._lock:
            if len(self._events) >= self.LIMIT:
                self._dropped += 1
                self._metrics.dropped.inc()
                if self._dropped % 1000 == 1:
                    log.warning("postgresql mirror is behind; dropping events", dropped=self._dropped)
                return
            self._events.append(row)
            self._pending_changed()

    def status(self, vm: str, row: tuple[Any, ...] | None) -> None:
        """The VM's row as it is now (UPSERT_STATUS's parameters), or None: its row goes."""
        with self._lock:
            self._statuses[vm] = (UPSERT_STATUS, row) if row is not None else (DELETE_STATUS, (self.host, vm))
            self._pending_changed()

    def news(self) -> Health | None:
        """The mirror's health when it changed since it was last ``told`` (a server that went away, or came
        back after being away), else None."""
        with self._lock:
            health = self._health
            return None if health is None or health.up == self._told else health

    def told(self, health: Health) -> None:
        """``health`` was reported: ``news`` says nothing more until it changes again."""
        with self._lock:
            self._told = health.up

    def close(self, flush_seconds: float = 5.0) -> None:
        """Send what is waiting (for a while at most, and only to a server that answers), then stop."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(flush_seconds)

    def _pending_changed(self) -> None:  # under the lock
        self._metrics.pending.set(len(self._events) + len(self._statuses))
        self._lock.notify_all()

    # -- the mirror's thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        import psycopg

        connection: Any = None
        delay = self.RETRY_FIRST
        while (wake := self._wait(connection is not None, delay)) is not None:
            try:
                if connection is None:
                    connection = self._connect()
                    self._resync(connection)
                elif wake == "probe":
                    connection.execute("SELECT 1")  # tells a server gone while there was nothing to write
                self._prune(connection)
                self._drain(connection)
            except SchemaTooNew as exc:
                log.error("postgresql mirror stopped", error=str(exc))
                self._set_health(Health(False, str(exc)))
                break
            except psycopg.OperationalError as exc:  # the server or the link: the same writes again later
                self._set_health(Health(False, " ".join(str(exc).split())), retry=delay)  # one line
                if connection is not None:
                    connection.close()
                connection = None
                delay = min(self.RETRY_MAX, delay * 2)
                continue
            self._set_health(Health(True))
            delay = self.RETRY_FIRST
        if connection is not None:
            connection.close()

    def _wait(self, connected: bool, delay: float) -> str | None:
        """Wait for writes (connected) or out the backoff (not). "write": send what waits; "probe": idle, ask
        the server whether it is there; None: closing and nothing more to do, the thread ends."""
        with self._lock:
            if not self._closing and connected:
                self._lock.wait_for(lambda: self._closing or self._events or self._statuses, self.PROBE_EVERY)
            elif not self._closing and self._health is not None:
                self._lock.wait_for(lambda: self._closing, delay)
            pending = bool(self._events or self._statuses)
            if not self._closing:
                return "write" if pending or not connected else "probe"
            # Closing: one last pass for what waits, to a server that answers; close() never waits on retries.
            if connected:
                return "write" if pending else None
            return "write" if self._health is None else None

    def _connect(self) -> Any:
        import psycopg
        from psycopg import conninfo

        given = conninfo.conninfo_to_dict(self.url)
        extra = {key: value for key, value in self.TCP.items() if key not in given}
        connection = psycopg.connect(conninfo.make_conninfo(self.url, **extra), autocommit=True, connect_timeout=5)
        try:
            migrate(connection)  # before the timeout: another host's long migration holds the lock
            connection.execute(f"SET statement_timeout = '{self.STATEMENT_TIMEOUT}'")
        except BaseException:
            connection.close()
            raise
        return connection

    def _resync(self, connection: Any) -> None:
        """Make this host's rows the local store's. The pending statuses are taken first: a status written
        after the snapshot is read is queued again and sent after it, so no row goes back in time."""
        if self._snapshot is None:
            return
        with self._lock:
            taken, self._statuses = self._statuses, {}
        try:
            rows = self._snapshot()
        except Exception as exc:  # the local store unreadable (sqlite3.Error, OSError): send the queue instead
            log.warning("postgresql mirror cannot read the local store; sending queued rows", error=str(exc))
            with self._lock:
                self._statuses = {**taken, **self._statuses}
            return
        with connection.transaction():
            connection.cursor().executemany(UPSERT_STATUS, rows)
            connection.execute(DELETE_OTHERS, (self.host, [row[1] for row in rows]))

    def _drain(self, connection: Any) -> None:
        """Send what waits, statuses first (a backlog of events must not hold them), one at a time: a write
        leaves the queue only once the server took it (or refused it for good)."""
        import psycopg

        while True:
            with self._lock:
                vm, item = next(iter(self._statuses.items()), (None, None))
                if item is None:
                    if not self._events:
                        return
                    item = (INSERT_EVENT, self._events[0])
            try:
                connection.execute(*item)
            except psycopg.OperationalError:
                raise
            except psycopg.Error as exc:  # this write itself is wrong: retrying would never end
                log.warning("postgresql mirror write refused", error=str(exc))
            with self._lock:
                if vm is None:
                    self._events.popleft()
                elif self._statuses.get(vm) is item:  # not replaced by a newer one meanwhile
                    del self._statuses[vm]
                self._pending_changed()

    def _prune(self, connection: Any) -> None:
        if self.retention_days > 0 and time.monotonic() - self._pruned_at > self.PRUNE_EVERY:
            connection.execute(PRUNE_EVENTS, (self.host, self.retention_days))
            self._pruned_at = time.monotonic()

    def _set_health(self, health: Health, retry: float | None = None) -> None:
        with self._lock:
            before, self._health = self._health, health
            pending = len(self._events) + len(self._statuses)
        self._metrics.up.set(1 if health.up else 0)
        if health.up:
            self._metrics.last_success.set_to_current_time()
            if before is not None and not before.up:
                log.info("postgresql mirror reconnected", pending=pending)
        elif before is None or before != health:  # once per outage (and per new error), not per retry
            log.warning("postgresql mirror unavailable; retrying", error=health.error, retry_seconds=retry,
                        pending=pending)
