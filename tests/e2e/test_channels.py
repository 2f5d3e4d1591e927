"""virtio-serial channels and the guest agent's port, seen from inside the guest and from the host.

The busybox guest reports the names of the virtio-serial ports it sees (``ports=``) and writes
``INFZ-PORT <name>`` to every port but the agent's: bytes written in the guest arrive on the channel's unix
socket, whose path ``status --json`` gives. It runs no guest agent, so ``status`` must say the agent is not
answering, within its deadline, and a stop must go on to the ACPI power button.
"""

from __future__ import annotations

import json
import socket
import time

from tests.e2e.harness import Host, vm_manifest

CHANNEL = "com.infinibay.service"
EXTRA = f"  guestAgent: {{enabled: true}}\n  channels: [{{name: {CHANNEL}}}]\n"


def _read_until(path: str, marker: bytes, timeout: float = 30) -> bytes:
    deadline = time.monotonic() + timeout
    seen = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        conn.settimeout(1)
        while marker not in seen and time.monotonic() < deadline:
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                break
            seen += chunk
    return seen


def test_channel_bytes_reach_the_host_and_a_silent_agent_is_reported_not_answering(host: Host) -> None:
    host.write("ch.yaml", vm_manifest("ch", extra=EXTRA))
    host.apply()
    guest = host.guest("ch")
    report = guest.wait_report(lambda r: len(r.ports) == 2, what="two virtio-serial ports")
    assert sorted(report.ports) == [CHANNEL, "org.qemu.guest_agent.0"]

    started = time.monotonic()
    status = json.loads(host.cli("status", "--json", check=True).stdout)["vms"][0]
    took = time.monotonic() - started
    path = status["channels"][CHANNEL]
    assert path.startswith(str(host.state / "vms" / "ch" / "run" / "ch-")) and path.endswith(".sock")
    assert status["agent"]["answering"] is False and "no answer within 2s" in status["agent"]["detail"]
    assert took < 20, f"status took {took:.1f}s with a silent agent"
    text = host.cli("status", check=True).stdout
    assert "agent: not answering" in text

    assert f"INFZ-PORT {CHANNEL}".encode() in _read_until(path, f"INFZ-PORT {CHANNEL}".encode())

    host.write("ch.yaml", vm_manifest("ch", extra=EXTRA, run_strategy="Halted"))
    applied = host.apply()
    assert "guest powered off" in applied.stdout, applied.stdout
    assert not host.qemu_pids("ch")


def test_channels_without_an_agent_have_no_agent_port(host: Host) -> None:
    host.write("ch.yaml", vm_manifest("ch", extra=f"  channels: [{{name: {CHANNEL}}}, {{name: x.two}}]\n"))
    host.apply()
    report = host.guest("ch").wait_report(lambda r: len(r.ports) == 2, what="two virtio-serial ports")
    assert sorted(report.ports) == [CHANNEL, "x.two"]
    status = json.loads(host.cli("status", "--json", check=True).stdout)["vms"][0]
    assert status["agent"] is None and set(status["channels"]) == {CHANNEL, "x.two"}
