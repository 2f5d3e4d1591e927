"""README's first command, `scripts/demo.sh`, as a user runs it: the set-up, the plan, the sync daemon on the
bundled manifests/, a guest that boots and a status that shows it running (in a state dir of the test's own)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

from tests.e2e.harness import ROOT, Host


def _user_exists(name: str) -> bool:
    import pwd
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_demo_boots_the_bundled_vm_under_the_sync_daemon(host: Host) -> None:
    done = subprocess.run(["bash", str(ROOT / "scripts/demo.sh")], capture_output=True, text=True, timeout=600,
                          env=host.env(), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    # The VM, and its firewall (user-mode NIC kept off the host's loopback) where the QEMU user exists.
    creates = 2 if _user_exists("infinization-qemu") else 1
    assert f"Plan: {creates} to create" in done.stdout
    assert "INFZ-REPORT" in done.stdout, "the guest reported in on its serial console"
    daemon = re.search(r"The sync daemon \(pid (\d+)\)", done.stdout)
    assert daemon, done.stdout
    try:
        status = json.loads(host.cli("status", "--json", str(ROOT / "manifests"), check=True).stdout)
        demo = {vm["name"]: vm for vm in status["vms"]}["demo"]
        assert demo["phase"] == "Running" and host.qemu_pids("demo") == [demo["pid"]]
        assert "Ready" in demo.get("conditions", {}), demo
    finally:
        os.kill(int(daemon.group(1)), signal.SIGTERM)
