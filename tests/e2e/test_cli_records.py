"""The CLI's own start, stop and apply are in the status store like the daemon's, and `status` finds the
directory a running `sync` keeps the host converged with."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from reconciler.runtime.store import VMStatus
from tests.e2e.harness import ROOT, Host, vm_manifest


def _row(host: Host, vm: str) -> VMStatus | None:
    assert (host.state / "infinization.db").exists(), "no status store"
    return host.stored_status(vm)


def _events(host: Host, vm: str) -> list[tuple[str, str]]:
    return [(e["kind"], e["result"]) for e in host.events(vm)]  # type: ignore[misc]


def test_cli_start_stop_and_apply_update_the_store(host: Host) -> None:
    host.write("m.yaml", vm_manifest("m", run_strategy="Manual"))
    host.apply()
    row = _row(host, "m")
    assert row is not None and row.phase == "Stopped" and "Ready" in row.conditions
    assert ("create-disk", "ok") in _events(host, "m")

    host.cli("start", "m", check=True)
    row = _row(host, "m")
    assert row is not None and row.phase == "Running" and row.pid == int(host.pidfile("m").read_text())
    assert ("start", "ok") in _events(host, "m")

    # On a terminal (script(1) gives it a pty) the step being waited on is shown with its wait so far.
    shown = subprocess.run(["script", "-qec", " ".join([*host._prefix(), sys.executable, "-m", "reconciler", "stop",
                                                        "m"]), "/dev/null"], capture_output=True, text=True,
                           env=host.env(), cwd=ROOT, timeout=180)
    assert shown.returncode == 0, shown.stdout
    assert re.search(r"… m: stop gracefully.*\(\d+s\)", shown.stdout), shown.stdout
    row = _row(host, "m")
    assert row is not None and row.phase == "Stopped" and row.pid is None
    assert _events(host, "m")[-1] == ("stop", "ok")

    (host.manifests / "m.yaml").unlink()
    host.apply("--allow-empty")
    assert _row(host, "m") is None  # deleted: its row goes, its events stay
    assert ("forget", "ok") in _events(host, "m")


def test_status_without_a_directory_while_sync_runs(host: Host) -> None:
    host.write("h.yaml", vm_manifest("h", run_strategy="Halted"))
    daemon = host.start_sync()
    try:
        def status() -> dict[str, object] | None:
            done = host.cli("status", "--json")
            return json.loads(done.stdout) if done.returncode == 0 and json.loads(done.stdout)["vms"] else None
        shown = host.wait_for(status, "status from sync's directory")
        assert isinstance(shown, dict) and shown["manifests"] == str(host.manifests.absolute())
        assert [vm["name"] for vm in shown["vms"]] == ["h"]
    finally:
        host.stop_sync(daemon)
