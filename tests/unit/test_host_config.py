"""The host's policy file: defaults, strict parsing with located errors, and how it is chosen."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.errors import ConfigInvalid
from reconciler.spec.host import HostConfig
from reconciler.spec.loader import load_host_config, load_host_config_text


def test_defaults_keep_the_demo_working_and_name_no_system_directory() -> None:
    config = HostConfig()
    assert "/var/cache/infinization" in config.storageRoots  # the demo's kernel and initrd live there
    assert not any(root in ("/", "/etc", "/usr", "/dev", "/proc", "/home") for root in config.storageRoots)
    assert config.port_range == (10000, 20000)


def test_a_valid_file_is_read() -> None:
    config, errors = load_host_config_text(
        "storageRoots: [/srv/vm-images]\nqemuUser: vmrunner\nportForwardRange: '2000-3000'\n", "c.yaml")
    assert errors == [] and config is not None
    assert config.storageRoots == ["/srv/vm-images"] and config.qemuUser == "vmrunner"
    assert config.port_range == (2000, 3000)


@pytest.mark.parametrize(("text", "where", "what"), [
    ("storageRoots: [relative/dir]\n", "c.yaml:1:16: storageRoots[0]", "absolute path"),
    ("storageRoots: [/srv, '/']\n", "c.yaml:1:1", "cannot be '/'"),
    ("portForwardRange: '20-10'\n", "c.yaml:1:19: portForwardRange", "port range"),
    ("qemuUser: 'root; rm'\n", "c.yaml:1:11: qemuUser", "pattern"),
    ("storageRoot: [/srv]\n", "c.yaml:1:1: storageRoot", "unknown field"),
    ("storageRoots: [/a]\nstorageRoots: [/b]\n", "c.yaml:2:1", "duplicate key"),
])
def test_errors_name_the_file_line_column_and_field(text: str, where: str, what: str) -> None:
    config, errors = load_host_config_text(text, "c.yaml")
    assert config is None
    assert any(str(error).startswith(where) and what in str(error) for error in errors), errors


def test_the_file_is_chosen_explicitly_then_by_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, by_env = tmp_path / "explicit.yaml", tmp_path / "env.yaml"
    explicit.write_text("qemuUser: one\n")
    by_env.write_text("qemuUser: two\n")
    monkeypatch.setenv("INFINIZATION_CONFIG", str(by_env))
    assert load_host_config(str(explicit)).qemuUser == "one"
    assert load_host_config(None).qemuUser == "two"
    by_env.write_text("qemuUser: [not, a, name]\n")
    with pytest.raises(ConfigInvalid, match=r"env\.yaml:1:11: qemuUser"):
        load_host_config(None)
    monkeypatch.setenv("INFINIZATION_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigInvalid, match="cannot read"):
        load_host_config(None)
