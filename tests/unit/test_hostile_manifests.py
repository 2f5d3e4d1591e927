"""Hostile manifest directories: whatever a commit puts there, reading is bounded, never blocks, never
crashes, and each problem is a located error of that file only (the others still load)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from reconciler.spec.loader import MAX_DEPTH, load_directory, load_text
from reconciler.spec.reading import MAX_BYTES

GOOD = "apiVersion: infinization.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: good}\nspec: {}\n"


def _load_with_deadline(directory: Path, seconds: float = 20) -> object:
    """load_directory in a thread: a hang fails the test instead of freezing it (no sleep: a join)."""
    box: list[object] = []
    worker = threading.Thread(target=lambda: box.append(load_directory(directory)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert box, "load_directory blocked"
    return box[0]


def _errors_by_file(directory: Path) -> dict[str, list[str]]:
    result = load_directory(directory)
    found: dict[str, list[str]] = {}
    for error in result.errors:
        found.setdefault(Path(error.file).name, []).append(str(error))
    return found


def test_symlink_to_dev_zero_is_refused_and_the_others_load(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    result = load_directory(tmp_path)
    assert "good" in result.vms
    assert [str(e) for e in result.errors] == [
        f"{tmp_path}/zero.yaml:1:1: a symlink out of the manifest directory (to /dev/zero) is refused"]
    assert result.failed_files == {str(tmp_path / "zero.yaml")}


def test_a_fifo_never_blocks_the_reader(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(GOOD)
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "pipe.yaml").symlink_to(tmp_path / "pipe")  # inside the directory: the symlink rule allows it
    os.mkfifo(tmp_path / "direct.yaml")
    result = _load_with_deadline(tmp_path)
    assert "good" in result.vms  # type: ignore[attr-defined]
    errors = sorted(str(e) for e in result.errors)  # type: ignore[attr-defined]
    assert errors == [f"{tmp_path}/direct.yaml:1:1: a FIFO, not a regular file: refused",
                      f"{tmp_path}/pipe.yaml:1:1: a FIFO, not a regular file: refused"]


def test_a_device_inside_the_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "null.yaml").symlink_to("/dev/null")
    assert _errors_by_file(tmp_path)["null.yaml"][0].endswith("(to /dev/null) is refused")


def test_size_cap(tmp_path: Path) -> None:
    (tmp_path / "big.yaml").write_text(GOOD + "#" * MAX_BYTES)
    (tmp_path / "good2.yaml").write_text(GOOD.replace("good", "good2"))
    result = load_directory(tmp_path)
    assert "good2" in result.vms
    assert [e.message for e in result.errors] == [
        f"{len(GOOD) + MAX_BYTES} bytes: over the {MAX_BYTES}-byte limit of a manifest file"]


def test_not_utf8_is_located(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_bytes(GOOD.encode() + b"# caf\xe9\n")
    assert _errors_by_file(tmp_path)["bad.yaml"] == [
        f"{tmp_path}/bad.yaml:5:6: not UTF-8: byte 0xe9 (invalid continuation byte)"]


def test_a_symlink_loop_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    errors = _errors_by_file(tmp_path)
    assert set(errors) == {"a.yaml", "b.yaml"}
    assert all("cannot read" in e for found in errors.values() for e in found)


def test_600_nested_brackets_are_a_located_error_not_a_recursion_error(tmp_path: Path) -> None:
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 600 + "]" * 600 + "\n")
    (tmp_path / "good.yaml").write_text(GOOD)
    result = load_directory(tmp_path)
    assert "good" in result.vms
    assert [str(e) for e in result.errors] == [
        f"{tmp_path}/deep.yaml:1:{3 + MAX_DEPTH}: invalid YAML: nested deeper than {MAX_DEPTH} levels"]


def test_deep_mappings_and_deep_values_in_a_field() -> None:
    deep_map = "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "x: 1\n"
    assert "nested deeper than" in str(load_text(deep_map, "f.yaml")[1][0])
    # A deep value where a model field expects a string: the cap comes before pydantic sees it.
    text = GOOD.replace("spec: {}", "spec: {runStrategy: " + "[" * 100 + "]" * 100 + "}")
    assert "nested deeper than" in str(load_text(text, "f.yaml")[1][0])


def test_aliases_cannot_nest_deeper_than_the_cap() -> None:
    levels = "a0: &a0 [" + "[" * 30 + "1" + "]" * 30 + "]\n"
    levels += "".join(f"a{i}: &a{i} [" + "[" * 30 + f"*a{i - 1}" + "]" * 30 + "]\n" for i in range(1, 40))
    errors = load_text(levels, "f.yaml")[1]
    assert errors and "nested deeper than" in str(errors[0])
