"""Every command that plans applies the host policy it was given (``--config`` / ``$INFINIZATION_CONFIG``):
``plan`` and ``status`` judge a manifest's paths by the same storage roots. Runs ``main`` in-process on real
temporary directories; nothing is started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.cli import main

VM = """apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {{name: web}}
spec:
  runStrategy: Halted
  boot: {{kernel: {kernel}}}
"""


@pytest.fixture
def site(tmp_path: Path) -> dict[str, str]:
    images = tmp_path / "images"
    images.mkdir()
    (images / "vmlinuz").write_bytes(b"kernel")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "web.yaml").write_text(VM.format(kernel=images / "vmlinuz"))
    config = tmp_path / "config.yaml"
    config.write_text(f"storageRoots: [{images}]\n")
    return {"manifests": str(manifests), "state": str(tmp_path / "state"), "config": str(config)}


@pytest.mark.parametrize("use_env", [False, True])
def test_plan_and_status_both_use_the_given_policy(site: dict[str, str], use_env: bool,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--state-dir", site["state"]]
    if use_env:
        monkeypatch.setenv("INFINIZATION_CONFIG", site["config"])
    else:
        args += ["--config", site["config"]]
    assert main(["plan", site["manifests"], *args]) == 0
    capsys.readouterr()
    assert main(["status", site["manifests"], "--json", *args]) == 0
    (row,) = json.loads(capsys.readouterr().out)["vms"]
    assert row["refused"] == []


def test_without_the_policy_the_same_kernel_is_outside_the_roots(site: dict[str, str],
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("INFINIZATION_CONFIG", raising=False)
    monkeypatch.setattr("reconciler.spec.loader.DEFAULT_CONFIG", site["config"] + ".absent")
    assert main(["status", site["manifests"], "--json", "--state-dir", site["state"]]) == 0
    (row,) = json.loads(capsys.readouterr().out)["vms"]
    assert any("spec.boot.kernel" in why and "outside the storage roots" in why for why in row["refused"])
