"""Who may do what under the state directory (issue 9): modes and owners set by ``state.files`` and the
status store, read back from the file system. Runs as root (chown); skipped otherwise."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from reconciler.errors import Refused
from reconciler.runtime.store import Store
from reconciler.state import files
from reconciler.state.layout import StateLayout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another user")
UID, GID = 64999, 64998  # QEMU's user and group (need not exist)


def _mode(path: Path) -> tuple[int, int, int]:
    info = path.lstat()
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


def test_qemu_may_traverse_to_its_run_directory_and_nothing_else(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    paths = layout.vm("web")
    files.prepare_vm_dirs(layout, paths, UID, GID)
    assert _mode(layout.root) == (0, GID, 0o710)
    assert _mode(layout.vms) == (0, GID, 0o710)
    assert _mode(paths.dir) == (0, GID, 0o710)
    assert _mode(paths.run) == (UID, GID, 0o700)
    assert _mode(layout.disks) == (0, 0, 0o700) and _mode(paths.disk_dir) == (0, 0, 0o700)
    files.write_restarts(paths, [1.0])
    assert _mode(paths.restarts) == (0, 0, 0o600)


def test_a_directory_others_cannot_traverse_is_named() -> None:
    base = Path(tempfile.mkdtemp(prefix="infz-modes-", dir="/tmp"))  # /tmp lets everyone through
    try:
        base.chmod(0o711)
        closed = base / "closed"
        (closed / "state").mkdir(parents=True)
        closed.chmod(0o700)
        assert files.unreachable_for(closed / "state" / "x", UID, GID) == closed
        os.chown(closed, 0, GID)
        closed.chmod(0o710)
        assert files.unreachable_for(closed / "state" / "x", UID, GID) is None, "its group may traverse it"
        assert files.unreachable_for(closed / "state" / "x", UID + 1, GID + 1) == closed, "others may not"
    finally:
        shutil.rmtree(base)


def test_check_private_refuses_what_others_can_write(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    layout.disks.mkdir(parents=True, mode=0o700)
    layout.root.chmod(0o710)
    files.check_private(layout)
    layout.disks.chmod(0o770)
    with pytest.raises(Refused, match="can be written by other users"):
        files.check_private(layout)
    layout.disks.chmod(0o700)
    os.chown(layout.root, UID, 0)
    with pytest.raises(Refused, match="owner uid 64999"):
        files.check_private(layout)


def test_the_store_and_its_wal_are_private_even_when_they_were_not(tmp_path: Path) -> None:
    database = tmp_path / "state" / "infinization.db"
    store = Store(database)
    store.event("a", "test", "ok", "a row")
    store.close()
    wal = Path(f"{database}-wal")
    for path in (database, wal):
        if path.exists():
            path.chmod(0o644)  # as an older version left them
    store = Store(database)
    store.event("a", "test", "ok", "another row")
    try:
        for path in (database, wal, Path(f"{database}-shm")):
            if path.exists():
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(database.parent.stat().st_mode) == 0o700
    finally:
        store.close()
