"""The daemon's manifest texts: a file event re-reads only the files it names, and the cross-file checks
still see the whole set (real files in a temporary directory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.runtime.manifests import ManifestTexts

HEAD = "apiVersion: infinization.io/v1alpha1\nkind: VirtualMachine\n"


def vm(name: str, cores: int = 1) -> str:
    return HEAD + f"metadata: {{name: {name}}}\nspec:\n  cpu: {{cores: {cores}}}\n"


def cores(texts: ManifestTexts, changed: set[str] | None, name: str) -> int:
    return texts.read(changed).vms[name].vm.spec.cpu.cores


def test_an_event_rereads_only_the_files_it_names(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(vm("a"))
    (tmp_path / "b.yaml").write_text(vm("b"))
    texts = ManifestTexts(tmp_path)
    texts.read()
    (tmp_path / "a.yaml").write_text(vm("a", cores=2))
    (tmp_path / "b.yaml").write_text(vm("b", cores=3))
    manifests = texts.read({str(tmp_path / "a.yaml")})
    assert manifests.vms["a"].vm.spec.cpu.cores == 2
    assert manifests.vms["b"].vm.spec.cpu.cores == 1, "b was not named: its kept text is used"
    assert cores(texts, None, "b") == 3, "a full read (the resync) reads every file"


def test_a_duplicate_name_in_a_new_file_is_an_error_in_both(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(vm("x"))
    texts = ManifestTexts(tmp_path)
    assert texts.read().ok
    (tmp_path / "b.yaml").write_text(vm("x", cores=2))
    manifests = texts.read({str(tmp_path / "b.yaml")})
    assert manifests.failed_files == {str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")}
    (tmp_path / "b.yaml").unlink()
    manifests = texts.read({str(tmp_path / "b.yaml")})
    assert manifests.ok and manifests.files == [str(tmp_path / "a.yaml")], "the removed file is dropped"


def test_a_directory_event_reads_everything(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(vm("a"))
    texts = ManifestTexts(tmp_path)
    texts.read()
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "c.yaml").write_text(vm("c"))
    assert set(texts.read({str(tmp_path / "team")}).vms) == {"a", "c"}
    (tmp_path / "team" / "c.yaml").rename(tmp_path / "c.yml.moved")
    (tmp_path / "team").rmdir()
    assert set(texts.read({str(tmp_path / "team")}).vms) == {"a"}, "a directory gone: its files are gone"


def test_hidden_and_other_files_change_nothing_and_a_broken_file_is_located(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(vm("a"))
    texts = ManifestTexts(tmp_path)
    texts.read()
    (tmp_path / ".a.yaml.swp").write_text("junk")
    (tmp_path / "README").write_text("notes")
    assert set(texts.read({str(tmp_path / ".a.yaml.swp"), str(tmp_path / "README")}).vms) == {"a"}
    (tmp_path / "a.yaml").write_text(HEAD + "metadata: {name: a}\nspec: {cpu: {cores: many}}\n")
    manifests = texts.read({str(tmp_path / "a.yaml")})
    assert manifests.failed_files == {str(tmp_path / "a.yaml")}
    assert any(error.line == 4 and "cores" in error.path for error in manifests.errors)


def test_a_read_that_fails_half_way_makes_the_next_read_a_full_one(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from reconciler.runtime import manifests

    (tmp_path / "a.yaml").write_text(vm("a"))
    (tmp_path / "b.yaml").write_text(vm("b"))
    texts = ManifestTexts(tmp_path)
    texts.read()
    (tmp_path / "a.yaml").write_text(vm("a", cores=2))
    real = manifests.read_file

    def failing(path: Path, root: Path) -> object:
        raise OSError("transient")

    monkeypatch.setattr(manifests, "read_file", failing)
    with pytest.raises(OSError):
        texts.read({str(tmp_path / "a.yaml")})
    monkeypatch.setattr(manifests, "read_file", real)
    assert cores(texts, {str(tmp_path / "b.yaml")}, "a") == 2, "a's change, lost with the failed read, is read"
