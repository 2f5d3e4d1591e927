"""Examples that boot the test guest are applied on real QEMU and checked from inside the guest."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.e2e.harness import ROOT, Host, in_netns


def test_example_port_forwards_boots_with_its_nic(host: Host) -> None:
    shutil.copy(ROOT / "examples/03-port-forwards/vm.yaml", host.manifests / "vm.yaml")
    host.apply()
    report = host.guest("ex-forwards").wait_report(lambda r: bool(r.nics), what="its NIC")
    assert report.nics["eth0"] == ("52:54:00:00:03:01", "up")
    listening = Path("/proc/net/tcp").read_text()
    assert f":{10022:04X} " in listening, "the host side of the forward must listen"
    assert host.plan_exit() == 0


def test_example_halted_then_removed(host: Host) -> None:
    shutil.copy(ROOT / "examples/04-halted-with-disposable-disk/vm.yaml", host.manifests / "vm.yaml")
    host.apply()
    assert host.qemu_pids("ex-halted") == []
    assert host.disk("ex-halted", "scratch").exists() and host.disk("ex-halted", "root").exists()
    (host.manifests / "vm.yaml").unlink()
    host.apply("--allow-empty")
    assert not host.disk("ex-halted", "scratch").exists()
    assert host.disk("ex-halted", "root").exists()


def test_example_auto_restart_restarts_without_flag(host: Host) -> None:
    text = (ROOT / "examples/05-auto-restart/vm.yaml").read_text()
    (host.manifests / "vm.yaml").write_text(text)
    host.apply()
    (pid,) = host.qemu_pids("ex-auto")
    host.guest("ex-auto").wait_report(lambda r: r.cpus == 1, what="1 cpu")
    (host.manifests / "vm.yaml").write_text(text.replace("cores: 1", "cores: 2"))
    host.apply()
    (new_pid,) = host.qemu_pids("ex-auto")
    assert new_pid != pid
    host.guest("ex-auto").wait_report(lambda r: r.cpus == 2, what="2 cpus")


def test_example_live_resources_grows_without_restart(host: Host) -> None:
    text = (ROOT / "examples/06-live-resources/vm.yaml").read_text()
    (host.manifests / "vm.yaml").write_text(text)
    host.apply()
    (pid,) = host.qemu_pids("ex-live")
    host.guest("ex-live").wait_report(lambda r: r.cpus == 1 and "sr0" in r.cds, what="boot")
    (host.manifests / "vm.yaml").write_text(text.replace("cores: 1,", "cores: 3,"))
    host.apply()
    host.guest("ex-live").wait_report(lambda r: r.cpus == 3, what="3 cpus")
    assert host.qemu_pids("ex-live") == [pid]


def test_example_bridged_network_firewall(net_host: Host) -> None:
    for name in ("network.yaml", "web.yaml"):
        shutil.copy(ROOT / "examples/07-bridged-network-firewall" / name, net_host.manifests / name)
    net_host.apply()
    report = net_host.guest("ex-web").wait_report(lambda r: r.ping.get("10.77.0.1") == "ok", what="gateway ping")
    assert report.nics["eth0"] == ("52:54:00:00:07:01", "up")
    # ICMP from the LAN is allowed in: the host (10.77.0.1) can ping the guest.
    assert in_netns(net_host.netns or "", "ping", "-c", "1", "-W", "2", "10.77.0.10", check=False).returncode == 0
    # Everything else meets the NIC's default, drop, in the live ruleset.
    ruleset = in_netns(net_host.netns or "", "nft", "list", "table", "bridge", net_host.table).stdout
    assert "ex-web/lan0 in default drop" in ruleset
    assert net_host.plan_exit() == 0
