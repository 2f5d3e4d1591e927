"""The manifest watcher (``runtime.filewatch``) on real inotify, in a temporary directory.

Every assertion is about the next batch: events come in order, so "nothing yet" is proven by a later,
unrelated change arriving alone, never by waiting for a silence.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from asyncinotify import Event, Mask

from reconciler.runtime.filewatch import ManifestWatcher, watch_files

DEADLINE = 10.0
Batches = AsyncIterator[set[str] | None]


async def _next(batches: Batches) -> set[str] | None:
    return await asyncio.wait_for(anext(batches), DEADLINE)


def _run(directory: Path, scenario: Callable[[Batches], Awaitable[None]], debounce_ms: int = 0) -> None:
    async def main() -> None:
        with ManifestWatcher(directory, debounce_ms) as watcher:
            await scenario(watcher.batches())
    asyncio.run(main())


def test_a_file_is_named_once_its_writer_closed_it_never_half_written(tmp_path: Path) -> None:
    async def scenario(batches: Batches) -> None:
        half = (tmp_path / "a.yaml").open("w")
        half.write("kind: VirtualMachine\n")
        half.flush()
        (tmp_path / "b.yaml").write_text("x: 1\n")
        assert await _next(batches) == {str(tmp_path / "b.yaml")}  # a.yaml is still open: not named
        half.close()
        assert await _next(batches) == {str(tmp_path / "a.yaml")}
    _run(tmp_path, scenario)


def test_renames_deletions_symlinks_and_chmod_are_named(tmp_path: Path) -> None:
    (tmp_path / "old.yaml").write_text("x: 1\n")
    (tmp_path / "gone.yaml").write_text("x: 1\n")

    async def scenario(batches: Batches) -> None:
        (tmp_path / "old.yaml").rename(tmp_path / "new.yaml")
        assert await _next(batches) == {str(tmp_path / "old.yaml"), str(tmp_path / "new.yaml")}
        (tmp_path / "gone.yaml").unlink()
        assert await _next(batches) == {str(tmp_path / "gone.yaml")}
        (tmp_path / "link.yaml").symlink_to(tmp_path / "new.yaml")
        assert await _next(batches) == {str(tmp_path / "link.yaml")}
        os.link(tmp_path / "new.yaml", tmp_path / "hard.yaml")  # no write to close: named when made
        assert str(tmp_path / "hard.yaml") in (await _next(batches) or set())
        (tmp_path / "new.yaml").chmod(0o000)
        assert await _next(batches) == {str(tmp_path / "new.yaml")}
    _run(tmp_path, scenario)


def test_an_editors_atomic_save_names_the_file(tmp_path: Path) -> None:
    async def scenario(batches: Batches) -> None:
        temporary = tmp_path / ".vm.yaml.tmp"
        temporary.write_text("x: 2\n")
        temporary.rename(tmp_path / "vm.yaml")
        named: set[str] = set()
        while str(tmp_path / "vm.yaml") not in named:  # the temporary file's close may come in its own batch
            named |= await _next(batches) or set()
    _run(tmp_path, scenario)


def test_new_subdirectories_are_watched_and_hidden_ones_are_not(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()

    async def scenario(batches: Batches) -> None:
        (tmp_path / ".git" / "index").write_text("x")  # under a hidden directory: not watched at all
        (tmp_path / "team").mkdir()
        assert await _next(batches) == {str(tmp_path / "team")}  # a directory: the reader reads everything
        (tmp_path / "team" / "sub").mkdir()
        assert await _next(batches) == {str(tmp_path / "team" / "sub")}
        (tmp_path / "team" / "sub" / "vm.yaml").write_text("x: 1\n")
        assert await _next(batches) == {str(tmp_path / "team" / "sub" / "vm.yaml")}
        (tmp_path / "team").rename(tmp_path / "moved")
        assert await _next(batches) == {str(tmp_path / "team"), str(tmp_path / "moved")}
        (tmp_path / "moved" / "sub" / "vm.yaml").write_text("x: 2\n")  # watched under its new path
        assert await _next(batches) == {str(tmp_path / "moved" / "sub" / "vm.yaml")}
    _run(tmp_path, scenario)


def test_a_replaced_directory_means_read_everything_and_the_new_one_is_watched(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()

    async def scenario(batches: Batches) -> None:
        manifests.rename(tmp_path / "old")
        assert await _next(batches) is None
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        (fresh / "vm.yaml").write_text("x: 1\n")
        fresh.rename(manifests)  # a deploy swapping in a new checkout
        assert await _next(batches) is None
        (tmp_path / "old" / "stale.yaml").write_text("x: 1\n")  # the old directory is no longer watched
        (manifests / "vm.yaml").write_text("x: 2\n")
        assert await _next(batches) == {str(manifests / "vm.yaml")}
    _run(manifests, scenario)


def test_paths_keep_the_directory_as_the_daemon_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)

    async def scenario(batches: Batches) -> None:
        (tmp_path / "m" / "vm.yaml").write_text("x: 1\n")
        assert await _next(batches) == {"m/vm.yaml"}
    _run(Path("m"), scenario)


def test_debounce_gathers_the_changes_that_follow_into_one_batch(tmp_path: Path) -> None:
    async def scenario(batches: Batches) -> None:
        async def write_later() -> None:
            (tmp_path / "a.yaml").write_text("x: 1\n")
            await asyncio.sleep(0.05)  # the writer's pace, inside the 0.5 s window
            (tmp_path / "b.yaml").write_text("x: 1\n")
        writer = asyncio.create_task(write_later())
        assert await _next(batches) == {str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")}
        await writer
    _run(tmp_path, scenario, debounce_ms=500)


def test_an_overflowed_queue_means_read_everything(tmp_path: Path) -> None:
    with ManifestWatcher(tmp_path) as watcher:
        overflow = Event(watch=None, mask=Mask.Q_OVERFLOW, cookie=0, name=None)
        assert watcher._changed([overflow]) is None


def test_a_failing_handler_does_not_end_the_watch(tmp_path: Path) -> None:
    seen: list[set[str] | None] = []
    first, second = asyncio.Event(), asyncio.Event()

    async def on_change(changed: set[str] | None) -> None:
        seen.append(changed)
        if len(seen) == 1:
            first.set()
            raise RuntimeError("a bug in the handler")
        second.set()

    async def main() -> None:
        watching = asyncio.create_task(watch_files(tmp_path, 0, on_change))
        await asyncio.sleep(0)  # let the watch start before the first write
        (tmp_path / "a.yaml").write_text("x: 1\n")
        await asyncio.wait_for(first.wait(), DEADLINE)  # the first batch: its handler fails
        (tmp_path / "b.yaml").write_text("x: 1\n")
        await asyncio.wait_for(second.wait(), DEADLINE)
        watching.cancel()
    asyncio.run(main())
    assert seen == [{str(tmp_path / "a.yaml")}, {str(tmp_path / "b.yaml")}]
