"""The local status store: rows keyed by the hostname by default, migrated forward from the empty-host
layout, and events pruned past the retention (this host's only)."""

from __future__ import annotations

import socket
import sqlite3
import time
from pathlib import Path

from reconciler.runtime.store import SCHEMA, Store, VMStatus


def test_rows_of_the_empty_host_layout_move_to_the_hostname(tmp_path: Path) -> None:
    path = tmp_path / "status.db"
    db = sqlite3.connect(path)
    for statement in SCHEMA:
        db.execute(statement)
    db.execute("INSERT INTO events (ts, host, vm, kind, result, message) VALUES (?, '', 'web', 'start', 'ok', '')",
               (time.time(),))
    db.execute("INSERT INTO vm_status (host, vm, phase, conditions) VALUES ('', 'web', 'Running', '{}')")
    db.commit()
    db.close()
    store = Store(path)
    try:
        assert store.host == socket.gethostname()
        assert [e["vm"] for e in store.events()] == ["web"]
        assert store.statuses()["web"].phase == "Running"
        assert store._db.execute("PRAGMA user_version").fetchone() == (2,)
    finally:
        store.close()
    again = Store(path)  # migrations run once
    assert again._db.execute("SELECT count(*) FROM events").fetchone() == (1,)
    again.close()


def test_old_events_of_this_host_are_pruned(tmp_path: Path) -> None:
    store = Store(tmp_path / "status.db", host="h1", retention_days=30)
    old = time.time() - 40 * 86400
    for host in ("h1", "h2"):
        store._db.execute("INSERT INTO events (ts, host, vm, kind, result, message) VALUES (?, ?, 'x', 'k', 'ok', '')",
                          (old, host))
    store.event("web", "start", "ok", "new")
    assert [e["vm"] for e in store.events()] == ["web"]
    assert store._db.execute("SELECT host FROM events WHERE vm = 'x'").fetchall() == [("h2",)]
    store.set_status(VMStatus(vm="web", phase="Stopped"))
    assert Store(tmp_path / "status.db", host="h1").statuses()["web"].phase == "Stopped"
    store.close()
