"""The sync daemon's manifest watcher: inotify, woken by the kernel, with no poll step.

Called by ``runtime.daemon`` (``watch_files``); what a batch names is read by ``runtime.manifests``. It
replaced watchfiles, whose Rust side wakes every ``step`` to look for queued changes: that poll was most of
an idle daemon's CPU, and an edit waited one to two steps before it was seen (docs/performance.md, issue 13).
Here the event loop reads the inotify descriptor when the kernel says it is readable, and nothing runs
between changes.

What is watched, and what a batch holds:

- the manifest directory and every directory under it except hidden ones (``.git``...: a full read skips
  them too); a directory made or moved in is watched before its batch is handed on, so a file written into
  it later has its own event and one written before is seen by the full read its directory event causes;
- a file's path once its writer closed it (``CLOSE_WRITE``: never half-written), or when it was moved in or
  out, deleted, its metadata changed (``chmod`` can make it unreadable), or it was made as a symlink or a
  hard link (which have no write to close); a new regular file waits for its ``CLOSE_WRITE``;
- ``None`` ("read everything") when the kernel's queue overflowed, or when the directory itself was deleted,
  moved away or replaced. The directory's parent is watched for its name, so a directory (or a symlink to
  one) put back in its place, as a deploy that swaps a checkout does, is watched again.

Each batch is every event already queued when the first one woke the loop, plus, with ``debounce_ms``, those
that arrive during that many milliseconds after it. No event is ever waited for with a timeout: a cancelled
read could lose the events it had taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import structlog
from asyncinotify import Event, Inotify, Mask, Watch

from reconciler.spec.loader import is_hidden

# A directory's entries: each gives the path it names.
ENTRY_EVENTS = (Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.DELETE | Mask.CREATE | Mask.ATTRIB)
TREE_MASK = ENTRY_EVENTS | Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.EXCL_UNLINK | Mask.ONLYDIR
PARENT_MASK = Mask.CREATE | Mask.MOVED_TO | Mask.ONLYDIR  # the directory's own name coming back
log = structlog.get_logger("infinization.sync")


class ManifestWatcher:
    """Batches of changed paths under ``directory`` (``None``: read everything). Use as a context manager."""

    def __init__(self, directory: Path, debounce_ms: int = 0) -> None:
        self.directory = directory.absolute()
        self._given = directory  # paths are handed on under the directory as the daemon names it
        self.debounce = max(debounce_ms, 0) / 1000
        self._inotify: Inotify | None = None
        self._parent: Watch | None = None
        self._tree: dict[Path, Watch] = {}  # absolute directory -> its watch

    def __enter__(self) -> ManifestWatcher:
        self.open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Start watching. :raise OSError: the kernel refused (inotify instance or watch limits)."""
        self._inotify = Inotify(sync_timeout=0)  # sync_get: only what is queued already, never a wait
        with contextlib.suppress(OSError):  # no parent to watch (the root file system's top): the tree alone
            self._parent = self._inotify.add_watch(self.directory.parent, PARENT_MASK)
        self._watch_tree(self.directory)

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._parent, self._tree = None, {}

    async def batches(self) -> AsyncIterator[set[str] | None]:
        inotify = self._require()
        while True:
            events = [await inotify.get()]
            if self.debounce:
                await asyncio.sleep(self.debounce)
            events.extend(iter(inotify.sync_get, None))
            changed = self._changed(events)
            if changed is None or changed:
                yield changed

    def _require(self) -> Inotify:
        if self._inotify is None:
            raise RuntimeError("ManifestWatcher used outside its `with` block")
        return self._inotify

    def _changed(self, events: Iterable[Event]) -> set[str] | None:
        changed: set[str] = set()
        everything = False
        for event in events:
            if Mask.Q_OVERFLOW in event.mask:
                everything = True
            elif self._parent is not None and event.watch is self._parent:
                if event.name is not None and event.name.name == self.directory.name:
                    self._rewatch()  # the directory (or a symlink to one) is back in its place
                    everything = True
            elif event.mask & (Mask.DELETE_SELF | Mask.MOVE_SELF):
                if event.watch is not None and event.watch.path == self.directory:
                    self._unwatch(self.directory)  # moved away: its watch would follow the old directory
                    everything = True
            elif event.mask & ENTRY_EVENTS and event.path is not None:
                path = self._entry(event, event.path)
                if path is not None:
                    changed.add(str(self._given / path.relative_to(self.directory)))
        return None if everything else changed

    def _entry(self, event: Event, path: Path) -> Path | None:
        """The path an entry event names, after keeping the watches of a directory's subtree current; None:
        nothing a reader needs yet (a regular file just made: its ``CLOSE_WRITE`` follows)."""
        if Mask.ISDIR in event.mask:
            if event.mask & (Mask.MOVED_FROM | Mask.DELETE):
                self._unwatch(path)
            elif event.mask & (Mask.CREATE | Mask.MOVED_TO):
                self._watch_tree(path)
            return path
        if Mask.CREATE in event.mask:
            try:
                info = path.lstat()
            except OSError:
                return path  # gone already: its removal is the change
            if not path.is_symlink() and info.st_nlink < 2:
                return None
        return path

    def _watch_tree(self, top: Path) -> None:
        """Watch ``top`` and its non-hidden directories (not through symlinks: a full read does not follow
        them either)."""
        if is_hidden(top.relative_to(self.directory)):
            return
        inotify = self._require()
        pending = [top]
        while pending:
            directory = pending.pop()
            try:
                self._tree[directory] = inotify.add_watch(directory, TREE_MASK)
                entries = list(os.scandir(directory))
            except OSError:  # gone, or not a directory: whoever removed it made an event of its own
                continue
            pending.extend(Path(entry.path) for entry in entries
                           if not is_hidden(Path(entry.name)) and entry.is_dir(follow_symlinks=False))

    def _unwatch(self, top: Path) -> None:
        inotify = self._require()
        for directory in [path for path in self._tree if path == top or top in path.parents]:
            watch = self._tree.pop(directory)
            with contextlib.suppress(OSError, ValueError, KeyError):  # the kernel dropped it already
                inotify.rm_watch(watch)

    def _rewatch(self) -> None:
        self._unwatch(self.directory)
        self._watch_tree(self.directory)


async def watch_files(directory: Path, debounce_ms: int, on_change: Callable[[set[str] | None], Any]) -> None:
    """Await ``on_change`` with each batch of changed paths under ``directory`` (``None``: read everything),
    until cancelled. Events that arrive while ``on_change`` runs make the next batch. Neither a watch the
    kernel refuses (``fs.inotify.max_user_watches``/``max_user_instances`` reached) nor a failing
    ``on_change`` ends the daemon: it says so, and the periodic resync still reads every file."""
    watcher = ManifestWatcher(directory, debounce_ms)
    try:
        watcher.open()
    except OSError as exc:
        watcher.close()
        log.error("cannot watch the manifest directory; changes are read at the next full resync",
                  directory=str(directory), error=str(exc))
        return
    try:
        async for changed in watcher.batches():
            try:
                await on_change(changed)
            except Exception:
                log.exception("handling a manifest change failed", directory=str(directory))
    finally:
        watcher.close()
