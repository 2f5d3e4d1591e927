"""Examples that boot the test guest are applied on real QEMU and checked from inside the guest."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.e2e.harness import ROOT, Host


def test_example_port_forwards_boots_with_its_nic(host: Host) -> None:
    shutil.copy(ROOT / "examples/03-port-forwards/vm.yaml", host.manifests / "vm.yaml")
    host.apply()
    report = host.guest("ex-forwards").wait_report(lambda r: bool(r.nics), what="its NIC")
    assert report.nics["eth0"] == ("52:54:00:00:03:01", "up")
    listening = Path("/proc/net/tcp").read_text()
    assert f":{42022:04X} " in listening, "the host side of the forward must listen"
    assert host.plan_exit() == 0


def test_example_halted_then_removed(host: Host) -> None:
    shutil.copy(ROOT / "examples/04-halted-with-disposable-disk/vm.yaml", host.manifests / "vm.yaml")
    host.apply()
    assert host.qemu_pids("ex-halted") == []
    assert host.disk("ex-halted", "scratch").exists() and host.disk("ex-halted", "root").exists()
    (host.manifests / "vm.yaml").unlink()
    host.apply()
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
