"""The daemon's Prometheus endpoint: an exposition `promtool check metrics` accepts, metrics that mean what
their help says (VMs by phase, per-VM readiness, drift only for changes made behind the reconciler's back,
build and process metrics), and a bad or taken --metrics-address as one clear error."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.request

import pytest

from tests.e2e.harness import Host, vm_manifest


def _free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def _value(text: str, series: str) -> float | None:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None



def test_metrics_mean_what_they_say_and_promtool_accepts_them(host: Host) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/setup.sh installs Debian's prometheus package"
    address = f"127.0.0.1:{_free_port()}"
    host.write("x.yaml", vm_manifest("x"))
    daemon = host.start_sync("--metrics-address", address)
    try:
        pid = host.wait_for(lambda: host.running_pid("x"), "x running")
        def ready() -> str | None:
            text = _scrape(address)
            return text if _value(text, 'infinization_vm_ready{vm="x"}') == 1 else None
        text = host.wait_for(ready, "x ready in the metrics")
        assert isinstance(text, str)
        checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert checked.returncode == 0 and checked.stdout.strip() == "" and checked.stderr.strip() == "", checked
        assert _value(text, 'infinization_vms{phase="Running"}') == 1
        assert _value(text, 'infinization_vms{phase="Stopped"}') == 0
        assert re.search(r'^infinization_build_info\{python="[^"]+",version="[^"]+"\} 1\.0$', text, re.MULTILINE)
        assert (_value(text, "process_resident_memory_bytes") or 0) > 10_000_000
        # Creating x was asked by its manifest: no drift.
        assert "infinization_drift_detected_total{" not in text

        os.kill(int(str(pid)), signal.SIGKILL)  # behind the reconciler's back
        host.wait_for(lambda: (p := host.running_pid("x")) and p != pid, "x restarted")
        host.wait_for(lambda: _value(_scrape(address), 'infinization_drift_detected_total{resource="VirtualMachine"}')
                      == 1, "the repair counted as drift")
    finally:
        host.stop_sync(daemon)


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1", "expected HOST:PORT"),
    ("::1:9464", "put an IPv6 address in brackets"),
    ("[nope]:9464", "is not an IPv6 address"),
    ("127.0.0.1:0", "a port from 1 to 65535"),
])
def test_a_malformed_metrics_address_is_one_error(host: Host, address: str, expected: str) -> None:
    done = host.cli("sync", str(host.manifests), "--metrics-address", address, timeout=30)
    assert done.returncode == 1 and expected in done.stderr and "Traceback" not in done.stderr, done


def test_a_taken_port_is_one_error_and_ipv6_loopback_works(host: Host) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = host.cli("sync", str(host.manifests), "--metrics-address", f"127.0.0.1:{port}", timeout=30)
    assert done.returncode == 1 and "the port is in use" in done.stderr and "Traceback" not in done.stderr, done
    if not socket.has_ipv6:
        return
    try:
        port6 = _free_port(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    daemon = host.start_sync("--metrics-address", f"[::1]:{port6}")
    try:
        text = host.wait_for(lambda: _try_scrape(f"[::1]:{port6}"), "metrics on [::1]")
        assert "infinization_build_info" in str(text)
    finally:
        host.stop_sync(daemon)


def _try_scrape(address: str) -> str | None:
    try:
        return _scrape(address)
    except OSError:
        return None
