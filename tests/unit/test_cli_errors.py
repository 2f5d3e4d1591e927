"""Errors a user sees are one ``error:`` line that says what to do, never a traceback (``reconciler.cli.main``).

These run ``main`` in-process on real (temporary) state directories: no QEMU, no mocks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.cli import main


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def test_a_corrupt_record_is_one_line_naming_the_file_and_what_to_do(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    record = tmp_path / "state" / "vms" / "web" / "record.json"
    record.parent.mkdir(parents=True)
    record.write_text("{not json")

    code = main(["status", str(manifests), "--state-dir", str(tmp_path / "state")])

    captured = capsys.readouterr()
    assert code == 1
    line = _one_error_line(captured.err)
    assert str(record) in line
    assert "fix or remove it by hand" in line
    assert "Traceback" not in captured.out


def test_an_unexpected_exception_is_one_internal_error_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFINIZATION_DEBUG", raising=False)
    # A serial log that is a directory: reading it fails with an error nobody planned for.
    (tmp_path / "vms" / "web" / "run" / "serial.log").mkdir(parents=True)

    code = main(["logs", "web", "--state-dir", str(tmp_path)])

    assert code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: internal error: IsADirectoryError: ")
    assert line.endswith("(set INFINIZATION_DEBUG=1 for the traceback)")


def test_infinization_debug_re_raises_for_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFINIZATION_DEBUG", "1")
    (tmp_path / "vms" / "web" / "run" / "serial.log").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        main(["logs", "web", "--state-dir", str(tmp_path)])


def test_a_cli_error_is_on_the_one_error_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status", "--state-dir", str(tmp_path)])
    assert code == 1
    assert _one_error_line(capsys.readouterr().err) == (
        "error: no manifest directory given and none applied yet: infinization status DIR")


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_sync_refuses_a_state_directory_other_users_can_write(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int) -> None:
    manifests, state = tmp_path / "manifests", tmp_path / "state"
    manifests.mkdir()
    (state / "vms").mkdir(parents=True, mode=0o700)
    state.chmod(0o710)
    (state / "vms").chmod(mode)  # e.g. a group or everyone could plant a VM folder with its own records

    code = main(["sync", str(manifests), "--state-dir", str(state), "--metrics-address", "none"])

    assert code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"{state / 'vms'} can be written by other users" in line and "make it root's, 0700" in line
    assert not (state / "infinization.db").exists(), "refused before the daemon opened anything"
