"""The daemon's record cache: a record is parsed again exactly when its file changed (real state files)."""

from __future__ import annotations

from pathlib import Path

from reconciler.runtime.records import RecordCache
from reconciler.spec.models import VirtualMachine
from reconciler.state import files
from reconciler.state.layout import StateLayout


def vm(name: str, cores: int = 1) -> VirtualMachine:
    return VirtualMachine.model_validate({"apiVersion": "infinization.io/v1alpha1", "kind": "VirtualMachine",
                                          "metadata": {"name": name}, "spec": {"cpu": {"cores": cores}}})


def test_records_follow_their_files(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    files.write_record(layout.vm("a"), vm("a"), None)
    files.write_record(layout.vm("b"), vm("b"), None)
    cache = RecordCache(layout)
    first = cache.read({})
    again = cache.read({})
    assert again["a"] is first["a"], "an unchanged file is not parsed again"
    files.write_record(layout.vm("a"), vm("a", cores=4), None)
    assert cache.read({})["a"].vm.spec.cpu.cores == 4, "a replaced record is read again"
    assert cache.read({})["b"] is first["b"]


def test_a_record_edited_in_place_to_corrupt_and_back(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    files.write_record(layout.vm("a"), vm("a"), None)
    cache = RecordCache(layout)
    cache.read({})
    record = layout.vm("a").dir / "record.json"
    good = record.read_text()
    record.write_text("{not json")  # in place: same inode
    corrupt: dict[str, str] = {}
    assert cache.read(corrupt) == {} and "a" in corrupt
    record.write_text(good)
    corrupt = {}
    assert set(cache.read(corrupt)) == {"a"} and not corrupt
    record.unlink()
    assert cache.read({}) == {}, "a removed record is gone"
