"""Bridged networking, per-NIC firewall, anti-spoofing, NAT and drift repair, proven by guests pinging.

Every test runs the reconciler inside a fresh network namespace (fixture ``net_host``), so the bridges,
TAPs, nftables tables and ip_forward it manages never touch the host's own networking.
"""

from __future__ import annotations

import subprocess
import uuid

from reconciler.spec.models import tap_name
from tests.e2e.harness import GUEST_DIR, Host, in_netns

NETWORK = """apiVersion: infinization.io/v1alpha1
kind: Network
metadata: {{name: lan}}
spec: {{bridge: br-lan, address: 10.77.0.1/24{extra}}}
"""


def vm(name: str, ip: str, ping: str, *, mac: str, rules: str = "", cmdline_extra: str = "",
       default: str = "accept") -> str:
    return f"""apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {{name: {name}}}
spec:
  machine: {{type: q35, accel: tcg}}
  memory: {{size: 256Mi}}
  terminationGracePeriodSeconds: 5
  boot:
    kernel: {GUEST_DIR}/vmlinuz
    initrd: {GUEST_DIR}/initrd.img
    cmdline: "console=ttyS0 panic=-1 infz.ip=eth0:{ip}/24 infz.gw=10.77.0.1 infz.ping={ping}{cmdline_extra}"
  disks: [{{name: root, size: 16Mi}}]
  networks:
    - name: lan0
      type: bridge
      network: lan
      mac: "{mac}"
      ips: ["{ip}"]
      firewall:
        default: {default}
        rules: [{rules}]
"""


def pinging(host: Host, name: str, target: str, result: str, timeout: float = 60):  # type: ignore[no-untyped-def]
    return host.guest(name).wait_report(lambda r: r.ping.get(target) == result, timeout=timeout,
                                        what=f"{name} ping {target} {result}")


def test_two_vms_ping_and_a_drop_rule_stops_it_live(net_host: Host) -> None:
    host = net_host
    host.write("net.yaml", NETWORK.format(extra=""))
    host.write("a.yaml", vm("a", "10.77.0.11", "10.77.0.12", mac="52:54:00:77:00:01"))
    host.write("b.yaml", vm("b", "10.77.0.12", "10.77.0.11", mac="52:54:00:77:00:02"))
    host.apply()
    pinging(host, "a", "10.77.0.12", "ok")
    pinging(host, "b", "10.77.0.11", "ok")
    pids = host.qemu_pids("a") + host.qemu_pids("b")
    assert host.plan_exit() == 0

    drop_icmp = "{direction: in, action: drop, protocol: icmp}"
    host.write("b.yaml", vm("b", "10.77.0.12", "10.77.0.11", mac="52:54:00:77:00:02", rules=drop_icmp))
    plan = host.cli("plan", str(host.manifests), check=True).stdout
    assert "b/lan0 in 1: drop icmp" in plan, "the plan shows the rule-level diff"
    host.apply()
    pinging(host, "a", "10.77.0.12", "fail")
    assert host.qemu_pids("a") + host.qemu_pids("b") == pids, "rule changes never restart a VM"

    host.write("b.yaml", vm("b", "10.77.0.12", "10.77.0.11", mac="52:54:00:77:00:02"))
    host.apply()
    pinging(host, "a", "10.77.0.12", "ok")
    assert host.qemu_pids("a") + host.qemu_pids("b") == pids
    assert host.plan_exit() == 0

    # Drift: a bridge deleted and a chain flushed by hand are shown by plan and repaired by apply.
    in_netns(host.netns or "", "ip", "link", "del", "br-lan")
    in_netns(host.netns or "", "nft", "flush", "chain", "bridge", host.table, f"in-{tap_name('b', 'lan0')}")
    pinging(host, "a", "10.77.0.12", "fail")
    drift = host.cli("plan", str(host.manifests), "--detailed-exitcode")
    assert drift.returncode == 2
    assert "drift: bridge br-lan is missing" in drift.stdout
    assert "rule(s) missing or changed" in drift.stdout
    host.apply()
    pinging(host, "a", "10.77.0.12", "ok")
    assert host.plan_exit() == 0
    assert host.qemu_pids("a") + host.qemu_pids("b") == pids


def test_a_guest_that_changes_its_mac_cannot_send(net_host: Host) -> None:
    host = net_host
    host.write("net.yaml", NETWORK.format(extra=""))
    host.write("a.yaml", vm("a", "10.77.0.11", "10.77.0.1", mac="52:54:00:77:00:01"))
    host.write("s.yaml", vm("spoof", "10.77.0.13", "10.77.0.1", mac="52:54:00:77:00:03",
                            cmdline_extra=" infz.mac=eth0:52:54:00:66:66:66"))
    host.apply()
    pinging(host, "a", "10.77.0.1", "ok")
    report = pinging(host, "spoof", "10.77.0.1", "fail", timeout=60)
    assert report.nics["eth0"][0] == "52:54:00:66:66:66", "the guest really changed its MAC"


def test_nat_reaches_an_address_beyond_the_host(net_host: Host) -> None:
    """An 'uplink' namespace at 10.200.0.2 with no route back to the guests' subnet: only NAT can reach it."""
    host = net_host
    uplink = f"infz-up-{uuid.uuid4().hex[:6]}"
    veth = f"vu{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", uplink], check=True)
    try:
        subprocess.run(["ip", "link", "add", veth, "netns", host.netns or "", "type", "veth", "peer", "name", "up0",
                        "netns", uplink], check=True)
        in_netns(host.netns or "", "ip", "addr", "add", "10.200.0.1/30", "dev", veth)
        in_netns(host.netns or "", "ip", "link", "set", veth, "up")
        in_netns(uplink, "ip", "addr", "add", "10.200.0.2/30", "dev", "up0")
        in_netns(uplink, "ip", "link", "set", "up0", "up")

        host.write("net.yaml", NETWORK.format(extra=", nat: true"))
        host.write("a.yaml", vm("a", "10.77.0.11", "10.200.0.2", mac="52:54:00:77:00:01"))
        host.apply()
        pinging(host, "a", "10.200.0.2", "ok")
        assert in_netns(host.netns or "", "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"

        # Without NAT the uplink cannot answer (it has no route back): the ping fails.
        host.write("net.yaml", NETWORK.format(extra=""))
        host.apply()
        pinging(host, "a", "10.200.0.2", "fail")
    finally:
        subprocess.run(["ip", "netns", "del", uplink], check=False)


def test_network_in_use_is_not_deleted(net_host: Host) -> None:
    host = net_host
    host.write("net.yaml", NETWORK.format(extra=""))
    host.write("a.yaml", vm("a", "10.77.0.11", "10.77.0.1", mac="52:54:00:77:00:01"))
    host.apply()
    (host.manifests / "net.yaml").unlink()
    # The VM still names the network: that is a manifest error, and nothing changes.
    refused = host.apply(check=False)
    assert refused.returncode == 1 and "no Network named 'lan'" in refused.stderr
    assert "br-lan" in in_netns(host.netns or "", "ip", "-br", "link").stdout
    # Removing both deletes the VM first, then the bridge (an empty directory needs --allow-empty).
    (host.manifests / "a.yaml").unlink()
    host.apply("--allow-empty")
    assert "br-lan" not in in_netns(host.netns or "", "ip", "-br", "link").stdout
    assert host.qemu_pids("a") == []


def test_bridged_nic_hot_plugged_with_multiqueue(net_host: Host) -> None:
    """A second bridged NIC (2 queues) is hot-plugged: its TAP fds go to QEMU over the monitor socket."""
    host = net_host
    host.write("net.yaml", NETWORK.format(extra=""))
    # The guest configures eth1 as soon as it appears (the cmdline must not change: that needs a restart).
    base = vm("a", "10.77.0.11", "10.77.0.1", mac="52:54:00:77:00:01").replace(
        "infz.ip=eth0:10.77.0.11/24", "infz.ip=eth0:10.77.0.11/24+eth1:10.77.0.21/24")
    host.write("a.yaml", base)
    host.apply()
    (pid,) = host.qemu_pids("a")
    pinging(host, "a", "10.77.0.1", "ok")

    second = base + (
        "    - {name: lan1, type: bridge, network: lan, mac: \"52:54:00:77:01:01\", queues: 2, "
        "ips: [\"10.77.0.21\"]}\n")
    host.write("a.yaml", second)
    applied = host.apply()
    assert "NIC lan1: hot-plug" in applied.stdout
    report = host.guest("a").wait_report(lambda r: ("52:54:00:77:01:01", "up") in r.nics.values()
                                         and "eth1" in r.ips, what="eth1 with its address")
    assert report.ips["eth1"] == ["10.77.0.21/24"]
    link = in_netns(host.netns or "", "ip", "-d", "link", "show", tap_name("a", "lan1")).stdout
    assert "master br-lan" in link and "multi_queue" in link
    assert host.qemu_pids("a") == [pid]
    assert host.plan_exit() == 0


def test_dhcp_gives_the_guest_an_address_and_is_supervised(net_host: Host) -> None:
    import json
    import os
    import signal

    host = net_host
    host.write("net.yaml", NETWORK.format(extra=", dhcp: {rangeStart: 10.77.0.100, rangeEnd: 10.77.0.150}"))
    guest = vm("d", "10.77.0.99", "10.77.0.1", mac="52:54:00:77:00:0d").replace(
        "infz.ip=eth0:10.77.0.99/24 ", "infz.dhcp=eth0 ").replace('      ips: ["10.77.0.99"]\n', "")
    host.write("d.yaml", guest)
    host.apply()
    report = pinging(host, "d", "10.77.0.1", "ok", timeout=90)
    (address,) = report.ips["eth0"]
    assert address.startswith("10.77.0.1") and address.endswith("/24")

    status = json.loads(host.cli("status", "--json", check=True).stdout)
    (network,) = status["networks"]
    assert network["dhcpPid"] is not None
    assert {"mac": "52:54:00:77:00:0d", "ip": address.split("/")[0]} in [
        {"mac": lease["mac"], "ip": lease["ip"]} for lease in network["leases"]]

    # dnsmasq dies: the next reconcile sees it and starts it again.
    os.kill(network["dhcpPid"], signal.SIGKILL)
    plan = host.cli("plan", str(host.manifests), "--detailed-exitcode")
    assert plan.returncode == 2 and "DHCP: start dnsmasq" in plan.stdout
    host.apply()
    assert host.plan_exit() == 0


def test_sync_daemon_repairs_a_deleted_bridge_on_the_netlink_event(net_host: Host) -> None:
    host = net_host
    host.write("net.yaml", NETWORK.format(extra=""))
    host.write("a.yaml", vm("a", "10.77.0.11", "10.77.0.1", mac="52:54:00:77:00:01"))
    daemon = host.start_sync("--resync-interval", "600")  # so only the netlink event can trigger the repair
    try:
        pinging(host, "a", "10.77.0.1", "ok", timeout=90)
        in_netns(host.netns or "", "ip", "link", "del", "br-lan")
        host.wait_for(lambda: "br-lan" in in_netns(host.netns or "", "ip", "-br", "link").stdout,
                      "the bridge to come back", timeout=20)
        pinging(host, "a", "10.77.0.1", "ok")
        assert any(e["kind"] == "ensure-bridge" and e["result"] == "ok" for e in host.events("lan"))
    finally:
        host.stop_sync(daemon)
