"""The PostgreSQL mirror against a real server: versioned schema, forward migrations (from the pre-version
layout too), timestamptz times, the indexes a backend's queries use, per-host retention, hostname as host."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.runtime import pgmirror
from reconciler.runtime.store import Store, VMStatus

psycopg = pytest.importorskip("psycopg")

LEGACY = [  # the layout before versioning: epoch seconds as doubles, no index, no version table
    """CREATE TABLE infinization_events (id BIGSERIAL PRIMARY KEY, ts DOUBLE PRECISION NOT NULL,
       host TEXT NOT NULL, vm TEXT NOT NULL, kind TEXT NOT NULL, result TEXT NOT NULL, message TEXT NOT NULL,
       duration_ms DOUBLE PRECISION)""",
    """CREATE TABLE infinization_vm_status (host TEXT NOT NULL, vm TEXT NOT NULL, phase TEXT NOT NULL, pid INTEGER,
       revision TEXT, conditions JSONB NOT NULL, last_reconcile DOUBLE PRECISION, duration_ms DOUBLE PRECISION,
       result TEXT, PRIMARY KEY (host, vm))""",
]


def _types(db: Any) -> dict[str, str]:
    rows = db.execute("SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
                      "WHERE column_name IN ('ts', 'last_reconcile')").fetchall()
    return dict(rows)


def test_a_legacy_database_is_migrated_forward_once(postgres: str) -> None:
    with psycopg.connect(postgres, autocommit=True) as db:
        for statement in LEGACY:
            db.execute(statement)
        db.execute("INSERT INTO infinization_events (ts, host, vm, kind, result, message) "
                   "VALUES (1700000000.5, 'h', 'web', 'start', 'ok', '')")
        assert pgmirror.migrate(db) == 0
        assert _types(db) == {"infinization_events.ts": "timestamp with time zone",
                              "infinization_vm_status.last_reconcile": "timestamp with time zone"}
        (ts,) = db.execute("SELECT extract(epoch FROM ts) FROM infinization_events").fetchone()
        assert float(ts) == 1700000000.5  # the old row kept its time
        versions = [r[0] for r in db.execute("SELECT version FROM infinization_schema_version ORDER BY version")]
        assert versions == [1, 2] == [v for v, _, _ in pgmirror.MIGRATIONS]
        assert pgmirror.migrate(db) == 2  # a second host, or a restart: nothing to do
        indexes = {r[0] for r in db.execute("SELECT indexname FROM pg_indexes WHERE tablename LIKE 'infinization%'")}
        assert {"infinization_events_host_vm_ts", "infinization_events_ts", "infinization_vm_status_phase"} <= indexes


def test_a_newer_schema_is_left_alone(postgres: str) -> None:
    with psycopg.connect(postgres, autocommit=True) as db:
        pgmirror.migrate(db)
        db.execute("INSERT INTO infinization_schema_version (version, description) VALUES (99, 'from the future')")
        with pytest.raises(pgmirror.SchemaTooNew, match="version 99, newer than this Infinization's 2"):
            pgmirror.migrate(db)


def test_the_per_vm_events_query_uses_its_index(postgres: str) -> None:
    with psycopg.connect(postgres, autocommit=True) as db:
        pgmirror.migrate(db)
        db.execute("SET enable_seqscan = off")  # a tiny table would be scanned anyway: ask what could serve it
        plan = "\n".join(r[0] for r in db.execute(
            "EXPLAIN SELECT * FROM infinization_events WHERE host = 'h' AND vm = 'web' ORDER BY ts DESC LIMIT 50"))
        assert "infinization_events_host_vm_ts" in plan


def _wait_rows(postgres: str, sql: str, want: int) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + 20
    while True:
        with psycopg.connect(postgres) as db:
            rows = db.execute(sql).fetchall()
        if len(rows) >= want or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_the_mirror_writes_timestamps_under_the_hostname_and_prunes_its_own_old_events(
        postgres: str, tmp_path: Path) -> None:
    with psycopg.connect(postgres, autocommit=True) as db:
        pgmirror.migrate(db)
        for host in (socket.gethostname(), "other-host"):  # 40 days old: past the 30-day retention
            db.execute("INSERT INTO infinization_events (ts, host, vm, kind, result, message) "
                       "VALUES (now() - interval '40 days', %s, 'old', 'start', 'ok', '')", (host,))
    store = Store(tmp_path / "status.db", database_url=postgres)
    before = time.time()
    try:
        store.event("web", "start", "ok", "started", 12.5)
        store.set_status(VMStatus(vm="web", phase="Running", pid=42, last_reconcile=before))
    finally:
        store.close()
    rows = _wait_rows(postgres, "SELECT host, vm, extract(epoch FROM ts) FROM infinization_events ORDER BY id", 2)
    assert [(h, vm) for h, vm, _ in rows] == [("other-host", "old"), (socket.gethostname(), "web")]
    assert abs(float(rows[-1][2]) - before) < 5
    status = _wait_rows(postgres, "SELECT host, phase, extract(epoch FROM last_reconcile) FROM "
                        "infinization_vm_status", 1)
    assert status[0][:2] == (socket.gethostname(), "Running") and abs(float(status[0][2]) - before) < 1


def _rows(url: str) -> dict[str, tuple[str, int | None]]:
    """This machine's status rows in PostgreSQL: VM -> (phase, pid); {} while the server is down (or the
    mirror has not created its tables yet)."""
    try:
        with psycopg.connect(url, connect_timeout=2) as db:
            return {vm: (phase, pid) for vm, phase, pid in db.execute(
                "SELECT vm, phase, pid FROM infinization_vm_status WHERE host = %s", (socket.gethostname(),))}
    except (psycopg.OperationalError, psycopg.errors.UndefinedTable):
        return {}


def _until(what: str, predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def _mirror_metric(name: str) -> float | None:
    from reconciler.runtime.metrics import REGISTRY

    return REGISTRY.get_sample_value(f"infinization_status_mirror_{name}")


def test_a_stopped_server_gets_every_vms_latest_status_when_it_is_back(
        postgres_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While PostgreSQL is down the store goes on (writes never wait), says so (an event, the metrics),
    keeps each VM's latest status however many events overflow the queue, and sends it all once the
    server is back: the rows are then the local store's, a deleted VM's row gone."""
    monkeypatch.setattr(pgmirror.Mirror, "LIMIT", 5)  # a long outage, in a few writes
    url = postgres_server.url
    store = Store(tmp_path / "status.db", database_url=url)
    try:
        store.set_status(VMStatus(vm="a", phase="Running", pid=10, conditions={"Ready": ""}))
        store.set_status(VMStatus(vm="b", phase="Running", pid=20, conditions={"Ready": ""}))
        _until("both rows", lambda: _rows(url) == {"a": ("Running", 10), "b": ("Running", 20)})
        assert _mirror_metric("up") == 1

        postgres_server.stop("fast")
        store.set_status(VMStatus(vm="a", phase="Stopped", pid=None))
        _until("the mirror to notice", lambda: _mirror_metric("up") == 0)
        for number in range(20):  # more than LIMIT: the newest events are dropped, never a status
            store.event("a", "tick", "ok", f"event {number}")
        store.set_status(VMStatus(vm="a", phase="Running", pid=11, conditions={"Ready": ""}))
        store.forget("b")
        store.set_status(VMStatus(vm="c", phase="Running", pid=30, conditions={"Ready": ""}))
        said = [e for e in store.events("-") if e["kind"] == "status-mirror"]
        assert [e["result"] for e in said] == ["failure"] and "unavailable" in str(said[0]["message"])
        assert (_mirror_metric("dropped_events_total") or 0) >= 15
        assert _mirror_metric("pending") == 5 + 3  # five events, three VMs' latest writes

        postgres_server.start()
        _until("the rows of the local store", lambda: _rows(url) == {"a": ("Running", 11), "c": ("Running", 30)})
        _until("the mirror up again", lambda: _mirror_metric("up") == 1 and _mirror_metric("pending") == 0)
        store.event("-", "later", "ok", "a write after the server came back")  # tells the store the news
        said = [e for e in store.events("-") if e["kind"] == "status-mirror"]
        assert [e["result"] for e in said] == ["failure", "ok"]
        with psycopg.connect(url) as db:
            mirrored = [m for (m,) in db.execute("SELECT message FROM infinization_events WHERE kind = 'tick' "
                                                 "ORDER BY id")]
        assert mirrored == [f"event {n}" for n in range(4)]  # the queued ones (the fifth was the news), in order
    finally:
        store.close()


def test_a_daemon_stopped_while_the_server_was_down_is_put_right_by_the_next_one(
        postgres_server: Any, tmp_path: Path) -> None:
    """Writes still queued when the store closes with the server down are lost from the queue, not from
    the truth: the next store to connect makes this host's rows the local store's (a VM deleted meanwhile
    has no row left, a VM restarted shows its new PID)."""
    url = postgres_server.url
    first = Store(tmp_path / "status.db", database_url=url)
    try:
        first.set_status(VMStatus(vm="a", phase="Running", pid=10))
        first.set_status(VMStatus(vm="b", phase="Running", pid=20))
        _until("both rows", lambda: _rows(url) == {"a": ("Running", 10), "b": ("Running", 20)})
        postgres_server.stop("immediate")  # a crash: no goodbye to the clients
        first.set_status(VMStatus(vm="a", phase="Running", pid=11))
        first.forget("b")
    finally:
        first.close()
    postgres_server.start()
    assert _rows(url) == {"a": ("Running", 10), "b": ("Running", 20)}  # what the first one left
    second = Store(tmp_path / "status.db", database_url=url)
    try:
        _until("the local store's rows", lambda: _rows(url) == {"a": ("Running", 11)})
    finally:
        second.close()


def test_an_outage_is_told_once_the_full_state_file_system_can_store_it(
        postgres_server: Any, tmp_path: Path) -> None:
    """The mirror goes down while the local store's file system is full: its status-mirror event cannot be
    stored then, and is stored by the first write that can be (not lost with the write that failed)."""
    state = tmp_path / "st"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "infz-pg-full", str(state)], check=True)
    store = None
    try:
        store = Store(state / "status.db", database_url=postgres_server.url)
        store.set_status(VMStatus(vm="a", phase="Running", pid=10))
        _until("the row", lambda: _rows(postgres_server.url) == {"a": ("Running", 10)})
        subprocess.run(["dd", "if=/dev/zero", f"of={state / 'filler'}", "bs=64k", "status=none"], check=False,
                       stderr=subprocess.DEVNULL)
        postgres_server.stop("fast")
        store.set_status(VMStatus(vm="a", phase="Running", pid=11))
        _until("the mirror to notice", lambda: _mirror_metric("up") == 0)
        for number in range(50):  # each fails to be stored locally; the news with it
            store.event("a", "tick", "ok", f"event {number} " + "x" * 4000)
        assert not [e for e in store.events("-") if e["kind"] == "status-mirror"]
        (state / "filler").unlink()
        store.event("a", "tick", "ok", "room again")
        said = [e for e in store.events("-") if e["kind"] == "status-mirror"]
        assert [e["result"] for e in said] == ["failure"]
    finally:
        if store is not None:
            store.close()
        subprocess.run(["umount", "-l", str(state)], check=False)
