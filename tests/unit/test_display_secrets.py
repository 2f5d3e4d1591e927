"""Reading a display's passwordFile under the host policy (on temporary files), and its keyed hash."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reconciler.adapters.secrets import keyed_digest, read_password
from reconciler.errors import Refused
from reconciler.spec.host import HostConfig


def _file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, HostConfig, str]:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    return secrets, HostConfig(secretDirs=[str(secrets)]), str(state)


def test_the_first_line_of_a_private_file_is_the_password(roots: tuple[Path, HostConfig, str]) -> None:
    secrets, host, state = roots
    assert read_password(str(_file(secrets / "a", "s3cret\nignored\n")), host, state) == "s3cret"


@pytest.mark.parametrize(("text", "mode", "error"), [
    ("s3cret\n", 0o640, "mode 0640: group or others may use it"),
    ("s3cret\n", 0o604, "mode 0604"),
    ("\n", 0o600, "non-empty password"),
    ("a\tb\n", 0o600, "without control characters"),
])
def test_loose_or_bad_files_are_refused_without_showing_the_content(
        roots: tuple[Path, HostConfig, str], text: str, mode: int, error: str) -> None:
    secrets, host, state = roots
    with pytest.raises(Refused, match=error) as caught:
        read_password(str(_file(secrets / "a", text, mode)), host, state)
    assert "s3cret" not in str(caught.value)


def test_a_file_outside_the_secret_dirs_or_a_link_leading_out_is_refused(
        roots: tuple[Path, HostConfig, str], tmp_path: Path) -> None:
    secrets, host, state = roots
    outside = _file(tmp_path / "elsewhere", "s3cret\n")
    with pytest.raises(Refused, match="outside"):
        read_password(str(outside), host, state)
    (secrets / "link").symlink_to(outside)
    with pytest.raises(Refused, match="resolves to"):
        read_password(str(secrets / "link"), host, state)


def test_the_hash_is_keyed_and_covers_the_vm_and_the_expiry() -> None:
    key, other = b"k" * 32, b"o" * 32
    base = keyed_digest(key, "web", "pw", None)
    assert base == keyed_digest(key, "web", "pw", None)
    assert len({base, keyed_digest(other, "web", "pw", None), keyed_digest(key, "db", "pw", None),
                keyed_digest(key, "web", "pw", 60), keyed_digest(key, "web", "pw2", None)}) == 5
