"""Host networking confinement (issue 9), proven from the state of the world inside a network namespace:
which rules each instance's tables hold, which frames a guest's port lets through, the bridge's IPv6
sysctls, and what QEMU's user may connect to on the host's loopback.

The VMs here are Halted: their NICs' rules are rendered all the same, and a veth named and bridged exactly
like the NIC's TAP stands in for the guest, so a test can send frames no busybox guest can craft (a raw
AF_PACKET socket on the veth's peer) and capture what crosses the bridge on another port.
"""

from __future__ import annotations

import json
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from reconciler.spec.models import tap_name
from tests.e2e.harness import GUEST_DIR, Host, in_netns

PY = "/usr/bin/python3"  # readable by any user (a pyenv shim under /root is not)

NETWORK = """apiVersion: infinization.io/v1alpha1
kind: Network
metadata: {{name: {name}}}
spec: {{bridge: {bridge}, address: {address}{extra}}}
"""


def halted_vm(name: str, network: str, mac: str, ips: str, extra: str = "") -> str:
    return f"""apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {{name: {name}}}
spec:
  runStrategy: Halted
  machine: {{type: q35, accel: tcg}}
  memory: {{size: 256Mi}}
  boot: {{kernel: {GUEST_DIR}/vmlinuz, initrd: {GUEST_DIR}/initrd.img, cmdline: console=ttyS0}}
  disks: [{{name: root, size: 16Mi}}]
  networks:
    - {{name: lan0, type: bridge, network: {network}, mac: "{mac}", ips: [{ips}]{extra}}}
"""


def rule_comments(netns: str, table: str) -> set[str]:
    """The comments of the rules in our tables of all families, from ``nft -j``."""
    found = set()
    for family in ("bridge", "ip", "inet"):
        done = in_netns(netns, "nft", "-j", "list", "table", family, table, check=False)
        if done.returncode == 0:
            found |= {item["rule"]["comment"] for item in json.loads(done.stdout)["nftables"]
                      if "rule" in item and "comment" in item["rule"]}
    return found


def test_two_state_directories_keep_their_own_rules(net_host: Host) -> None:
    netns = net_host.netns or ""
    first = net_host
    second = Host(Path(tempfile.mkdtemp(prefix="infz-", dir="/tmp")), netns=netns)
    try:
        first.write("net.yaml", NETWORK.format(name="lan", bridge="br-lan", address="10.77.0.1/24", extra=""))
        first.write("a.yaml", halted_vm("a", "lan", "52:54:00:77:01:01", "10.77.0.11"))
        second.write("net.yaml", NETWORK.format(name="dmz", bridge="br-dmz", address="10.78.0.1/24", extra=""))
        second.write("b.yaml", halted_vm("b", "dmz", "52:54:00:77:01:02", "10.78.0.12"))
        # The one table all instances shared before: stale rules of an older version, deleted by the upgrade.
        in_netns(netns, "nft", "add table bridge infinization; add chain bridge infinization c; "
                 "add rule bridge infinization c drop")
        first.apply()
        assert in_netns(netns, "nft", "list", "table", "bridge", "infinization", check=False).returncode != 0
        first_rules = rule_comments(netns, first.table)
        assert any("a/lan0 anti-spoofing ipv4" in c for c in first_rules)
        second.apply()
        second_rules = rule_comments(netns, second.table)
        assert any("b/lan0 anti-spoofing ipv4" in c for c in second_rules)
        assert not any("a/lan0" in c for c in second_rules)
        # Each instance plans nothing for the other's rules, and the first's rules survive both applies.
        assert first.plan_exit() == 0 and second.plan_exit() == 0
        first.apply()
        second.apply()
        assert rule_comments(netns, first.table) == first_rules
        assert rule_comments(netns, second.table) == second_rules
        # A state directory with no bridged NIC at all leaves both alone too.
        third = Host(Path(tempfile.mkdtemp(prefix="infz-", dir="/tmp")), netns=netns)
        try:
            third.apply()
            assert rule_comments(netns, first.table) == first_rules
            assert rule_comments(netns, second.table) == second_rules
            assert len({first.table, second.table, third.table}) == 3
        finally:
            shutil.rmtree(third.base, ignore_errors=True)
    finally:
        shutil.rmtree(second.base, ignore_errors=True)


def test_bridges_ignore_router_advertisements_unless_the_network_asks_for_ipv6(net_host: Host) -> None:
    netns = net_host.netns or ""

    def sysctls(bridge: str) -> tuple[str, str]:
        return tuple(in_netns(netns, "cat", f"/proc/sys/net/ipv6/conf/{bridge}/{key}").stdout.strip()
                     for key in ("accept_ra", "autoconf"))  # type: ignore[return-value]

    net_host.write("net.yaml", NETWORK.format(name="lan", bridge="br-lan", address="10.77.0.1/24", extra="")
                   + "---\n" + NETWORK.format(name="v6", bridge="br-v6", address="10.79.0.1/24", extra=", ipv6: true"))
    net_host.apply()
    assert sysctls("br-lan") == ("0", "0")
    assert sysctls("br-v6") == ("1", "1"), "a Network with ipv6: true keeps the kernel's defaults"
    # Drift: turned back on by hand, shown by plan, repaired by apply.
    in_netns(netns, "sysctl", "-qw", "net.ipv6.conf.br-lan.accept_ra=1")
    drift = net_host.cli("plan", str(net_host.manifests), "--detailed-exitcode")
    assert drift.returncode == 2 and "br-lan accepts IPv6 router advertisements" in drift.stdout
    net_host.apply()
    assert sysctls("br-lan") == ("0", "0")
    assert net_host.plan_exit() == 0


# Runs inside the namespace: sends each frame (hex) on the guest's side of the veth, captures on another
# bridge port, and prints the markers (the frames' last 8 bytes) that arrived there.
_SEND_AND_CAPTURE = r"""
import socket, sys, time
frames = [bytes.fromhex(h) for h in sys.argv[3:]]
cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
cap.bind((sys.argv[2], 0))
cap.settimeout(0.2)
out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
out.bind((sys.argv[1], 0))
for frame in frames:
    out.send(frame)
seen, deadline = set(), time.monotonic() + 1.5
while time.monotonic() < deadline:
    try:
        data = cap.recv(65535)
    except socket.timeout:
        continue
    seen.add(data[-8:].hex())
print(" ".join(sorted(seen)))
"""


def _checksum(data: bytes) -> int:
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data) - 1, 2))
    total += data[-1] << 8 if len(data) % 2 else 0
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _ipv4_udp(src_mac: str, src: str, marker: bytes) -> bytes:
    import ipaddress
    payload = b"\x30\x39\x30\x39" + (8 + len(marker)).to_bytes(2, "big") + b"\0\0" + marker
    header = bytearray(b"\x45\x00" + (20 + len(payload)).to_bytes(2, "big") + b"\0\0\0\0\x40\x11\0\0"
                       + ipaddress.ip_address(src).packed + bytes([10, 77, 0, 255]))
    header[10:12] = _checksum(bytes(header)).to_bytes(2, "big")
    return b"\xff" * 6 + _mac(src_mac) + b"\x08\x00" + bytes(header) + payload


def _arp(src_mac: str, claimed: str, marker: bytes, tag: bytes = b"") -> bytes:
    import ipaddress
    body = (b"\x00\x01\x08\x00\x06\x04\x00\x02" + _mac(src_mac) + ipaddress.ip_address(claimed).packed
            + b"\xff" * 6 + ipaddress.ip_address(claimed).packed)
    return b"\xff" * 6 + _mac(src_mac) + tag + b"\x08\x06" + body + marker


def _ipv6(src_mac: str, src: str, next_header: int, body: bytes, marker: bytes) -> bytes:
    import ipaddress
    payload = body + marker
    header = (b"\x60\0\0\0" + len(payload).to_bytes(2, "big") + bytes([next_header, 255])
              + ipaddress.ip_address(src).packed + ipaddress.ip_address("ff02::1").packed)
    return b"\x33\x33\0\0\0\x01" + _mac(src_mac) + b"\x86\xdd" + header + payload


def _router_advertisement(src_mac: str, marker: bytes) -> bytes:
    # ICMPv6 type 134: hop limit 64, router lifetime 1800 s, a prefix-information option for 2001:db8::/64.
    prefix = (b"\x03\x04\x40\xc0" + (86400).to_bytes(4, "big") * 2 + b"\0" * 4
              + bytes.fromhex("20010db8000000000000000000000000"))
    body = b"\x86\x00\x00\x00\x40\x00\x07\x08" + b"\0" * 8 + prefix
    return _ipv6(src_mac, "fe80::5054:ff:fe77:102", 58, body, marker)


def test_frames_a_guest_must_not_send_do_not_leave_its_port(net_host: Host) -> None:
    """Guest a declares only IPv4; guest b IPv4 and IPv6. Their TAPs are veths (named like the TAPs, on the
    bridge), their rules those `infinization apply` installed; capture on a third port of the bridge."""
    netns = net_host.netns or ""
    a_mac, b_mac = "52:54:00:77:01:01", "52:54:00:77:01:02"
    net_host.write("net.yaml", NETWORK.format(name="lan", bridge="br-lan", address="10.77.0.1/24", extra=""))
    net_host.write("a.yaml", halted_vm("a", "lan", a_mac, "10.77.0.11"))
    net_host.write("b.yaml", halted_vm("b", "lan", b_mac, '10.77.0.12, "fd00::12"'))
    net_host.apply()
    for name, peer in ((tap_name("a", "lan0"), "ga"), (tap_name("b", "lan0"), "gb"), ("cap0", "cap1")):
        in_netns(netns, "ip", "link", "add", name, "type", "veth", "peer", "name", peer)
        in_netns(netns, "ip", "link", "set", name, "master", "br-lan", "up")
        in_netns(netns, "ip", "link", "set", peer, "up")
    assert net_host.plan_exit() == 0, "the stand-in TAPs change nothing the plan looks at"

    def send(port: str, frames: dict[str, bytes]) -> set[str]:
        done = subprocess.run(["ip", "netns", "exec", netns, PY, "-c", _SEND_AND_CAPTURE, port, "cap1",
                               *(frame.hex() for frame in frames.values())],
                              capture_output=True, text=True, check=True, timeout=30)
        markers = {bytes.fromhex(m).decode(errors="replace").rstrip("\0") for m in done.stdout.split()}
        return {name for name in frames if name in markers}

    tagged = b"\x81\x00\x00\x07"
    from_a = {
        "ok-ipv4": _ipv4_udp(a_mac, "10.77.0.11", b"ok-ipv4\0"),
        "ok-arp": _arp(a_mac, "10.77.0.11", b"ok-arp\0\0"),
        "tagarp": _arp(a_mac, "10.77.0.1", b"tagarp\0\0", tag=tagged),
        "qinqarp": _arp(a_mac, "10.77.0.1", b"qinqarp\0", tag=b"\x88\xa8\x00\x07"),
        "a-ipv6": _ipv6(a_mac, "fe80::5054:ff:fe77:101", 17, b"\x30\x39\x30\x39\x00\x10\x00\x00", b"a-ipv6\0\0"),
        "unknown": b"\xff" * 6 + _mac(a_mac) + b"\x88\xb5" + b"\0" * 46 + b"unknown\0",
    }
    assert send("ga", from_a) == {"ok-ipv4", "ok-arp"}
    from_b = {
        "ok-ipv6": _ipv6(b_mac, "fd00::12", 17, b"\x30\x39\x30\x39\x00\x10\x00\x00", b"ok-ipv6\0"),
        "spoof6": _ipv6(b_mac, "fd00::99", 17, b"\x30\x39\x30\x39\x00\x10\x00\x00", b"spoof6\0\0"),
        "ra": _router_advertisement(b_mac, b"ra\0\0\0\0\0\0"),
    }
    assert send("gb", from_b) == {"ok-ipv6"}
    # Nor did the host take anything from the advertisement.
    assert "2001:db8" not in in_netns(netns, "ip", "-6", "addr").stdout
    assert "default" not in in_netns(netns, "ip", "-6", "route").stdout


QEMU_USER = "infinization-qemu"
_CONNECT = r"""
import socket, sys
s = socket.socket()
s.settimeout(3)
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""
_LISTEN_ONCE = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
c.sendall(c.recv(100).upper())
"""


@pytest.fixture
def qemu_user() -> pwd.struct_passwd:
    """The host's QEMU user (created as a system user when missing; left in place: it is the setup's)."""
    try:
        return pwd.getpwnam(QEMU_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", QEMU_USER],
                       check=False, capture_output=True)
        return pwd.getpwnam(QEMU_USER)


def test_qemus_user_cannot_open_connections_to_the_hosts_loopback(net_host: Host,
                                                                 qemu_user: pwd.struct_passwd) -> None:
    """What a user-mode NIC's guest reaches is what QEMU's uid may connect to: not 127.0.0.1, while an
    inbound connection to a socket it listens on (a hostfwd) still works."""
    netns = net_host.netns or ""
    net_host.write("vm.yaml", f"""apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {{name: u}}
spec:
  runStrategy: Halted
  memory: {{size: 256Mi}}
  boot: {{kernel: {GUEST_DIR}/vmlinuz, initrd: {GUEST_DIR}/initrd.img, cmdline: console=ttyS0}}
  disks: [{{name: root, size: 16Mi}}]
  networks: [{{name: nat, type: user}}]
""")
    net_host.apply()
    assert any("no new connections to 127.0.0.0/8" in c for c in rule_comments(netns, net_host.table))
    as_qemu = ["setpriv", f"--reuid={qemu_user.pw_uid}", f"--regid={qemu_user.pw_gid}", "--clear-groups"]
    server = subprocess.Popen(["ip", "netns", "exec", netns, PY, "-c", _LISTEN_ONCE, "18080"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        connect = ["ip", "netns", "exec", netns]
        as_user = subprocess.run([*connect, *as_qemu, PY, "-c", _CONNECT, "18080"],
                                 capture_output=True, text=True, timeout=30)
        assert as_user.stdout.strip() == "ConnectionRefusedError", as_user
        # The same connection from root works: the rule is about QEMU's uid, not the port.
        as_root = subprocess.run([*connect, PY, "-c", _CONNECT, "18080"], capture_output=True, text=True,
                                 timeout=30)
        assert as_root.stdout.strip() == "connected"
    finally:
        server.kill()
        server.wait()
        server.stdout.close()  # type: ignore[union-attr]
    # hostfwd: QEMU's uid listens, a client connects in, and the replies (established) pass.
    listener = subprocess.Popen(["ip", "netns", "exec", netns, *as_qemu, PY, "-c", _LISTEN_ONCE, "18081"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        reply = in_netns(netns, PY, "-c", "import socket; s = socket.create_connection(('127.0.0.1', 18081), "
                         "timeout=5); s.sendall(b'ping'); print(s.recv(100).decode())")
        assert reply.stdout.strip() == "PING"
    finally:
        listener.kill()
        listener.wait()
        listener.stdout.close()  # type: ignore[union-attr]
