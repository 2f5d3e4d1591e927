"""Displays, proven with real clients: VNC (RFB 3.8, VNC authentication) and SPICE (a link handshake with an
RSA-encrypted ticket) against the QEMU the reconciler started.

The password lives in a file under the host policy's ``secretDirs``; the tests check that a wrong password
is refused, that a changed file is rotated live by ``apply`` (same QEMU), that QEMU listens only where the
manifest says (``ss -ltnp``), and that the secret is found nowhere in the state directory, QEMU's command
line and log, or the output of plan, apply and status.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
from pathlib import Path

import pytest

from tests.e2e.display_clients import Refused, spice_link, vnc_frame
from tests.e2e.harness import GUEST_DIR, Host, vm_manifest


def _policy(host: Host) -> tuple[Path, tuple[int, int]]:
    """This host's policy with a secrets directory and a display port range of its own (free right now)."""
    secret_dir = host.base / "secrets"
    secret_dir.mkdir(mode=0o700)
    low = _free_range()
    host.config.write_text(f"storageRoots: [{host.base}, {GUEST_DIR}]\nportForwardRange: 10000-20000\n"
                           f"displayPortRange: {low}-{low + 9}\nsecretDirs: [{secret_dir}]\n")
    return secret_dir, (low, low + 9)


def _free_range() -> int:
    """The start of ten consecutive ports nothing listens on (between 20000 and 29990)."""
    busy = set()
    for line in subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout.splitlines():
        busy.add(int(line.split()[3].rsplit(":", 1)[1]))
    start = 20000 + secrets.randbelow(990) * 10
    while any(port in busy for port in range(start, start + 10)):
        start = 20000 + secrets.randbelow(990) * 10
    return start


def _secret(secret_dir: Path, name: str, value: str, mode: int = 0o600) -> Path:
    path = secret_dir / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    os.chmod(path, mode)
    return path


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on (ss -ltnp)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        if re.search(rf"pid={pid},", line):
            address, _, port = line.split()[3].rpartition(":")
            found.add((address.strip("[]"), int(port)))
    return found


def _status(host: Host, name: str) -> dict[str, object]:
    vms = json.loads(host.cli("status", "--json", check=True).stdout)["vms"]
    return next(vm for vm in vms if vm["name"] == name)


def _assert_nowhere(host: Host, pid: int, texts: list[str], *passwords: str) -> None:
    """No password in any file under the state directory, QEMU's argv, or the outputs given."""
    for path in host.state.rglob("*"):
        if path.is_file() and not path.is_socket():
            data = path.read_bytes()
            for password in passwords:
                assert password.encode() not in data, f"the password is in {path}"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    for password in passwords:
        assert password.encode() not in cmdline, "the password is on QEMU's command line"
        for text in texts:
            assert password not in text, f"the password is in the output:\n{text}"


def _qmp(socket_path: Path, command: str, arguments: dict[str, object]) -> dict[str, object]:
    """One command on QEMU's monitor, as someone else on the host could send it (behind our back)."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(socket_path))
        stream = conn.makefile("rw")
        stream.readline()  # greeting
        for message in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
            stream.write(json.dumps(message) + "\n")
            stream.flush()
            while "return" not in (answer := json.loads(stream.readline())) and "error" not in answer:
                pass  # an event
        return answer


def _refused(check: object) -> bool:
    try:
        check()  # type: ignore[operator]
    except Refused:
        return True
    return False


def test_vnc_password_is_set_over_qmp_and_rotated_live(host: Host) -> None:
    secret_dir, (low, _high) = _policy(host)
    old, new = secrets.token_hex(4), secrets.token_hex(4)  # 8 characters: VNC's limit
    password_file = _secret(secret_dir, "vnc1.display", old)
    host.write("vnc1.yaml", vm_manifest("vnc1", extra=f"  display: {{type: vnc, passwordFile: {password_file}}}\n"))
    planned = host.cli("plan", str(host.manifests))
    applied = host.apply()
    pid = host.qemu_pids("vnc1")[0]

    status = _status(host, "vnc1")
    assert status["display"] == f"vnc://127.0.0.1:{low}", status
    assert _listening(pid) == {("127.0.0.1", low)}
    console = host.cli("console", "vnc1", check=True).stdout.strip()
    assert console == f"vnc://127.0.0.1:{low}"

    # The guest sees the video card that fits VNC (virtio-vga) and the tablet's USB controller (qemu-xhci).
    report = host.guest("vnc1").wait_report(lambda r: bool(r.pci), what="the PCI report")
    assert {"0300:1af4:1050", "0c03:1b36:000d"} <= set(report.pci), report.pci
    assert not any(device.startswith("0403:") for device in report.pci), "no sound card without audio"

    width, height, rectangles = vnc_frame("127.0.0.1", low, old)
    assert width > 0 and height > 0 and rectangles > 0
    assert _refused(lambda: vnc_frame("127.0.0.1", low, new))

    _secret(secret_dir, "vnc1.display", new)
    plan = host.cli("plan", str(host.manifests))
    assert plan.returncode == 0 and "display password rotated" in plan.stdout, plan.stdout
    rotated = host.apply()
    assert "display password rotated" in rotated.stdout
    assert host.qemu_pids("vnc1") == [pid], "the rotation restarted QEMU"
    assert _refused(lambda: vnc_frame("127.0.0.1", low, old))
    assert vnc_frame("127.0.0.1", low, new)[2] > 0
    assert host.plan_exit() == 0, "in sync after the rotation"

    # The sync daemon rotates it too (its periodic resync reads the file's hash), still with no restart.
    third = secrets.token_hex(4)
    daemon = host.start_sync()
    try:
        _secret(secret_dir, "vnc1.display", third)
        host.wait_for(lambda: not _refused(lambda: vnc_frame("127.0.0.1", low, third)), "the daemon's rotation", 90)
    finally:
        assert host.stop_sync(daemon) == 0
    assert host.qemu_pids("vnc1") == [pid] and _refused(lambda: vnc_frame("127.0.0.1", low, new))

    texts = [planned.stdout, planned.stderr, applied.stdout, applied.stderr, plan.stdout, rotated.stdout,
             host.cli("status", "--json").stdout, host.cli("status").stdout,
             host.cli("plan", str(host.manifests), "--json").stdout, host.cli("logs", "vnc1").stdout,
             json.dumps(host.events()), (host.base / "sync.log").read_text()]
    assert any("display password" in event["message"] for event in host.events()), host.events()
    _assert_nowhere(host, pid, texts, old, new, third)


def test_a_restarted_qemu_gets_the_password_again_and_keeps_its_port(host: Host) -> None:
    secret_dir, (low, _high) = _policy(host)
    password = secrets.token_hex(4)
    password_file = _secret(secret_dir, "vnc2.display", password)
    # Another VM takes the first port of the range: this one's auto port is the next, and stays its own.
    host.write("a.yaml", vm_manifest("a", extra="  display: {type: vnc}\n"))
    host.write("vnc2.yaml", vm_manifest("vnc2", extra=f"  display: {{type: vnc, passwordFile: {password_file}}}\n"))
    host.apply()
    assert _status(host, "a")["display"] == f"vnc://127.0.0.1:{low}"
    assert _status(host, "vnc2")["display"] == f"vnc://127.0.0.1:{low + 1}"
    first = host.qemu_pids("vnc2")[0]
    host.cli("stop", "vnc2", check=True)
    host.cli("start", "vnc2", check=True)
    second = host.qemu_pids("vnc2")[0]
    assert second != first
    assert _listening(second) == {("127.0.0.1", low + 1)}, "the port changed across a restart"
    assert vnc_frame("127.0.0.1", low + 1, password)[2] > 0
    # The VM without a password (loopback only) lets a client in with no authentication at all.
    with socket.create_connection(("127.0.0.1", low), timeout=10) as conn:
        conn.recv(12)
        conn.sendall(b"RFB 003.008\n")
        assert conn.recv(2) == b"\x01\x01", "security type None expected"

    # Someone moves the VNC server over the monitor: query-vnc shows it, the plan calls it drift, and a
    # restart puts it back where the manifest says (with the password set again).
    answer = _qmp(host.state / "vms" / "vnc2" / "run" / "qmp.sock", "display-update",
                  {"type": "vnc", "addresses": [{"type": "inet", "host": "127.0.0.2", "port": str(low + 1)}]})
    assert "return" in answer, answer
    assert _listening(second) == {("127.0.0.2", low + 1)}
    drift = host.cli("plan", str(host.manifests))
    assert f"display drift: QEMU's display server is vnc on 127.0.0.2:{low + 1}" in drift.stdout, drift.stdout
    host.apply("--allow-restart")
    third = host.qemu_pids("vnc2")[0]
    assert third != second and _listening(third) == {("127.0.0.1", low + 1)}
    assert vnc_frame("127.0.0.1", low + 1, password)[2] > 0
    assert host.plan_exit() == 0


def test_spice_accepts_its_ticket_and_refuses_another(host: Host) -> None:
    secret_dir, (low, _high) = _policy(host)
    ticket = secrets.token_urlsafe(18)
    password_file = _secret(secret_dir, "sp1.display", ticket)
    extra = (f"  display: {{type: spice, port: {low + 5}, passwordFile: {password_file}, "
             "spice: {agent: true, imageCompression: auto_glz, streamingVideo: filter}}\n"
             "  audio: {enabled: true}\n")
    host.write("sp1.yaml", vm_manifest("sp1", extra=extra))
    applied = host.apply()
    pid = host.qemu_pids("sp1")[0]
    assert _status(host, "sp1")["display"] == f"spice://127.0.0.1:{low + 5}"
    assert _listening(pid) == {("127.0.0.1", low + 5)}
    assert spice_link("127.0.0.1", low + 5, ticket) == 0
    assert spice_link("127.0.0.1", low + 5, ticket + "x") != 0
    assert spice_link("127.0.0.1", low + 5, "") != 0
    # The guest sees the vdagent port, the QXL card and the ich9 HD Audio controller.
    report = host.guest("sp1").wait_report(lambda r: "com.redhat.spice.0" in r.ports, what="the vdagent port")
    assert {"0300:1b36:0100", "0403:8086:293e", "0c03:1b36:000d"} <= set(report.pci), report.pci
    _assert_nowhere(host, pid, [applied.stdout, host.cli("status", "--json").stdout], ticket)


def test_plan_refuses_a_held_port_a_readable_password_file_and_no_password_beyond_loopback(host: Host) -> None:
    secret_dir, (low, _high) = _policy(host)
    loose = _secret(secret_dir, "loose.display", "abcd1234", mode=0o644)
    elsewhere = _secret(host.base, "elsewhere.display", "abcd1234")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", low + 3))
        squatter.listen()
        host.write("held.yaml", vm_manifest("held", extra=f"  display: {{type: vnc, port: {low + 3}}}\n"))
        host.write("loose.yaml", vm_manifest("loose", extra=f"  display: {{type: vnc, passwordFile: {loose}}}\n"))
        host.write("out.yaml", vm_manifest("out", extra=f"  display: {{type: vnc, passwordFile: {elsewhere}}}\n"))
        plan = host.cli("plan", str(host.manifests))
    assert plan.returncode == 1, plan.stdout
    assert f"spec.display.port: {low + 3} is in use by another process" in plan.stdout, plan.stdout
    assert "mode 0644" in plan.stdout and "outside" in plan.stdout, plan.stdout
    assert "abcd1234" not in plan.stdout + plan.stderr

    for name in ("held.yaml", "loose.yaml", "out.yaml"):
        (host.manifests / name).unlink()
    host.write("open.yaml", vm_manifest("open", extra="  display: {type: vnc, listen: 0.0.0.0}\n"))
    refused = host.cli("plan", str(host.manifests))
    assert refused.returncode != 0
    assert "beyond loopback: a passwordFile is required" in refused.stdout + refused.stderr


@pytest.mark.parametrize("kind", ["vnc"])
def test_two_vms_never_share_a_fixed_port(host: Host, kind: str) -> None:
    _secret_dir, (low, _high) = _policy(host)
    host.write("p1.yaml", vm_manifest("p1", extra=f"  display: {{type: {kind}, port: {low + 2}}}\n",
                                      run_strategy="Halted"))
    host.write("p2.yaml", vm_manifest("p2", extra=f"  display: {{type: {kind}, port: {low + 2}}}\n",
                                      run_strategy="Halted"))
    plan = host.cli("plan", str(host.manifests))
    assert plan.returncode == 1
    assert f"spec.display.port: {low + 2} is already the display port of VM p1" in plan.stdout, plan.stdout
