"""The sync daemon's desired-state cache, on real manifest and state directories and a real SQLite store."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.runtime.cache import HOST, DesiredCache
from reconciler.runtime.store import Store
from reconciler.spec.loader import load_text
from reconciler.spec.models import VirtualMachine
from reconciler.state import files
from reconciler.state.layout import StateLayout

HEAD = "apiVersion: infinization.io/v1alpha1\nkind: VirtualMachine\n"


def vm_yaml(name: str, cores: int = 1, host: str | None = None) -> str:
    on = f"\n  host: {host}" if host else ""
    return HEAD + f"metadata: {{name: {name}}}\nspec:\n  cpu: {{cores: {cores}}}{on}\n"


NETWORK = "apiVersion: infinization.io/v1alpha1\nkind: Network\nmetadata: {name: lan}\nspec: {bridge: br-lan}\n"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Path, StateLayout, Store]]:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    layout = StateLayout(tmp_path / "state")
    store = Store(tmp_path / "state" / "infinization.db")
    yield manifests, layout, store
    store.close()


def _record(layout: StateLayout, text: str, source: Path) -> None:
    objects, errors = load_text(text, str(source))
    assert not errors, errors
    vm = objects[0][0]
    assert isinstance(vm, VirtualMachine)
    files.write_record(layout.vm(vm.name), vm, str(source))


def _event_messages(store: Store) -> list[str]:
    return [str(event["message"]) for event in store.events()]


def test_reads_this_hosts_vms_and_names_the_changed_keys(env: tuple[Path, StateLayout, Store]) -> None:
    manifests, layout, store = env
    (manifests / "a.yaml").write_text(vm_yaml("a"))
    (manifests / "b.yaml").write_text(vm_yaml("b", host="elsewhere"))
    cache = DesiredCache(manifests, layout, store, host=None)
    assert cache.load() == {"a"}
    assert set(cache.state.vms) == {"a"}, "a VM of another host is not ours"
    assert cache.load() == set(), "nothing changed"
    (manifests / "a.yaml").write_text(vm_yaml("a", cores=2))
    assert cache.load() == {"a"}
    (manifests / "a.yaml").unlink()
    (manifests / "c.yaml").write_text(vm_yaml("c"))
    assert cache.load() == {"a", "c"}
    (manifests / "net.yaml").write_text(NETWORK)
    assert cache.load() == {HOST, "c"}, "a Network concerns the host and every VM"


def test_a_broken_file_keeps_its_vms_last_good_spec(env: tuple[Path, StateLayout, Store]) -> None:
    manifests, layout, store = env
    (manifests / "a.yaml").write_text(vm_yaml("a", cores=2))
    (manifests / "b.yaml").write_text(vm_yaml("b"))
    cache = DesiredCache(manifests, layout, store, host=None)
    cache.load()
    (manifests / "a.yaml").write_text(vm_yaml("a", cores=3) + "  bogus: 1\n")
    assert cache.load() == {"a"}, "a's state changed: it is now kept invalid"
    assert cache.state.vms["a"].vm.spec.cpu.cores == 2, "the last good spec, not the broken edit"
    assert "bogus" in " ".join(cache.state.invalid["a"])
    assert "b" not in cache.state.invalid
    assert any("bogus" in message for message in _event_messages(store))
    (manifests / "a.yaml").write_text(vm_yaml("a", cores=3))
    assert cache.load() == {"a"}
    assert cache.state.vms["a"].vm.spec.cpu.cores == 3 and cache.state.invalid == {}


def test_a_daemon_started_on_a_broken_file_starts_from_the_records(env: tuple[Path, StateLayout, Store]) -> None:
    manifests, layout, store = env
    _record(layout, vm_yaml("a", cores=2), manifests / "a.yaml")
    _record(layout, vm_yaml("x", host="elsewhere"), manifests / "x.yaml")
    (manifests / "a.yaml").write_text("::: not yaml")
    cache = DesiredCache(manifests, layout, store, host=None)
    cache.load()
    assert set(cache.state.vms) == {"a"}, "kept from its record; another host's record is not ours"
    assert cache.state.vms["a"].vm.spec.cpu.cores == 2
    assert "a" in cache.state.invalid


def test_an_empty_directory_deletes_nothing(env: tuple[Path, StateLayout, Store]) -> None:
    manifests, layout, store = env
    (manifests / "a.yaml").write_text(vm_yaml("a"))
    cache = DesiredCache(manifests, layout, store, host=None)
    cache.load()
    (manifests / "a.yaml").unlink()
    assert cache.load() == set()
    assert set(cache.state.vms) == {"a"}
    assert any("holds no manifests" in message for message in _event_messages(store))
    # Also when the daemon starts on an empty directory: the records are the last good state.
    _record(layout, vm_yaml("a"), manifests / "a.yaml")
    fresh = DesiredCache(manifests, layout, store, host=None)
    fresh.load()
    assert set(fresh.state.vms) == {"a"}


def test_recorded_networks_are_kept_while_any_file_fails(env: tuple[Path, StateLayout, Store]) -> None:
    manifests, layout, store = env
    (manifests / "net.yaml").write_text(NETWORK)
    (manifests / "a.yaml").write_text(vm_yaml("a"))
    cache = DesiredCache(manifests, layout, store, host=None)
    cache.load()
    files.write_network_record(layout, cache.state.networks["lan"].network)
    (manifests / "net.yaml").write_text("::: not yaml")
    fresh = DesiredCache(manifests, layout, store, host=None)  # a daemon started now
    fresh.load()
    assert set(fresh.state.networks) == {"lan"}, "kept from its record: its file (or any file) fails"
    (manifests / "net.yaml").unlink()
    fresh.load()
    assert fresh.state.networks == {}, "every file reads cleanly and none names it: it goes"


def test_waits_while_git_holds_index_lock(env: tuple[Path, StateLayout, Store]) -> None:
    manifests, layout, store = env
    subprocess.run(["git", "init", "-q", str(manifests)], check=True)
    lock = manifests / ".git" / "index.lock"
    lock.touch()
    cache = DesiredCache(manifests, layout, store, host=None)

    async def wait_and_release() -> float:
        stopping = asyncio.Event()
        waiting = asyncio.create_task(cache.wait_for_git(stopping))
        await asyncio.sleep(0.2)
        assert not waiting.done(), "still waiting for git"
        lock.unlink()
        began = time.monotonic()
        await asyncio.wait_for(waiting, 2)
        return time.monotonic() - began

    assert asyncio.run(wait_and_release()) < 1
    assert any("index.lock" in message for message in _event_messages(store))
    lock.touch()
    began = time.monotonic()
    asyncio.run(cache.wait_for_git(asyncio.Event(), limit=0.2))  # a stale lock is waited out, then ignored
    assert 0.2 <= time.monotonic() - began < 2
    assert any("stale?" in message for message in _event_messages(store))


def test_a_failing_read_keeps_the_last_good_state(env: tuple[Path, StateLayout, Store],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    manifests, layout, store = env
    _record(layout, vm_yaml("a"), manifests / "a.yaml")
    cache = DesiredCache(manifests, layout, store, host=None)

    def explode(directory: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr("reconciler.runtime.manifests.manifest_files", explode)
    assert cache.reload() == set()
    assert set(cache.state.vms) == {"a"}, "never an empty desired state: that would delete every VM"
    assert any("disk on fire" in message for message in _event_messages(store))


def test_a_slow_read_never_holds_up_the_event_loop(env: tuple[Path, StateLayout, Store],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a read of the manifests waits on (a slow file system, a hostile file), the daemon's loop
    goes on restarting VMs: the read runs in a worker thread."""
    import threading

    from reconciler.runtime import manifests as manifests_module

    manifests, layout, store = env
    (manifests / "a.yaml").write_text(vm_yaml("a"))
    release = threading.Event()
    real = manifests_module.manifest_files

    def slow(directory: Path) -> object:
        assert release.wait(30), "the loop never got to release the read"
        return real(directory)

    monkeypatch.setattr(manifests_module, "manifest_files", slow)
    cache = DesiredCache(manifests, layout, store, None)

    async def scenario() -> set[str]:
        reading = asyncio.create_task(cache.reload_async())
        await asyncio.sleep(0)  # the read starts, and blocks in its thread
        release.set()  # only possible if this coroutine runs while the read waits
        return await reading

    assert asyncio.run(scenario()) == {"a"}
