"""Kill -9 an apply at the step boundaries of live changes, a restart and a network change on a running,
bridged VM; each re-run must converge with nothing leaked.

One VM goes through a chain of changes (so the guest boots twice, not once per point): a disk added, that
disk grown, a bridged NIC added, a firewall rule added, a second Network (bridge + its firewall) added, and a
restart-needing change applied with ``--allow-restart``. Each change is applied once by an apply that
SIGKILLs itself at the chain's point for it (``INFINIZATION_CRASH_AT``), then by a plain apply. After each:
the guest sees the change, the plan is empty, one QEMU (the same one except across the restart), and no leak:
no extra process, TAP, nft chain, socket, pidfile or cgroup, no temporary file, and the ``keep`` disk (a clone
of an image the test wrote a pattern into, never changed by the manifest) reads byte-identical to its image
(``qemu-img compare``). The chain runs twice, killing before the steps and after them. At the end, deleting
everything leaves no process, TAP, bridge, nft table, VM folder or cgroup.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.apply.crashpoints import CRASH_ENV
from reconciler.spec.models import tap_name
from reconciler.state.layout import StateLayout
from tests.e2e.harness import GUEST_DIR, Host, Report, in_netns

VM = "cs"
MiB = 1024**2
CGROUPS = Path("/sys/fs/cgroup/infinization")


@dataclass(frozen=True)
class Shape:
    """What the manifests ask for at one point of the chain."""

    extra: int | None = None  # MiB of the added disk
    lan1: bool = False
    drop_icmp: bool = False
    lan2: bool = False
    queues: int = 1


def _manifests(host: Host, base_image: Path, shape: Shape) -> None:
    network = ("apiVersion: infinization.io/v1alpha1\nkind: Network\nmetadata: {name: %s}\n"
               "spec: {bridge: %s, address: %s}\n")
    host.write("net.yaml", network % ("lan", "br-lan", "10.77.0.1/24"))
    if shape.lan2:
        host.write("net2.yaml", network % ("lan2", "br-lan2", "10.78.0.1/24"))
    else:
        (host.manifests / "net2.yaml").unlink(missing_ok=True)
    rules = "{direction: in, action: drop, protocol: icmp}" if shape.drop_icmp else ""
    extra = f"    - {{name: extra, size: {shape.extra}Mi}}\n" if shape.extra else ""
    lan1 = '    - {name: lan1, type: bridge, network: lan, mac: "52:54:00:cc:00:02"}\n' if shape.lan1 else ""
    host.write("vm.yaml", f"""apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {{name: {VM}}}
spec:
  machine: {{type: q35, accel: tcg}}
  memory: {{size: 256Mi}}
  hotplugSlots: 4
  terminationGracePeriodSeconds: 5
  boot: {{kernel: {GUEST_DIR}/vmlinuz, initrd: {GUEST_DIR}/initrd.img, cmdline: "console=ttyS0 panic=-1"}}
  disks:
    - {{name: root, size: 64Mi}}
    - {{name: keep, image: {base_image}, size: 16Mi}}
{extra}  networks:
    - name: lan0
      type: bridge
      network: lan
      mac: "52:54:00:cc:00:01"
      queues: {shape.queues}
      firewall: {{default: accept, rules: [{rules}]}}
{lan1}""")


def _pattern_image(host: Host) -> Path:
    """A qcow2 with a known pattern in its first MiB: the VM's ``keep`` disk is a linked clone of it."""
    image = host.base / "pattern.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 0 1M", str(image)], check=True,
                   capture_output=True)
    image.chmod(0o644)
    return image


def _cgroups(host: Host) -> list[Path]:
    """This VM's cgroups (named after its folder and a hash of its path, as vmprocess names them)."""
    folder = StateLayout(host.state).vm(VM).dir
    name = f"{folder.name[:40]}-{hashlib.sha256(str(folder).encode()).hexdigest()[:12]}"
    return [group for group in CGROUPS.glob(name) if group.is_dir()] if CGROUPS.is_dir() else []


def _chains(host: Host) -> set[str]:
    listed = in_netns(host.netns or "", "nft", "list", "ruleset").stdout
    return {line.split()[1] for line in listed.splitlines()
            if line.strip().startswith("chain ") and line.split()[1].startswith(("in-", "out-"))}


def _taps(host: Host) -> set[str]:
    links = in_netns(host.netns or "", "ip", "-br", "link").stdout
    return {line.split()[0].split("@")[0] for line in links.splitlines() if line.split()[0].startswith("inz")}


def _check_no_leak(host: Host, shape: Shape, base_image: Path) -> int:
    """One verified QEMU and exactly what the shape asks on the host; its pid."""
    pids = host.qemu_pids(VM)
    assert len(pids) == 1, f"exactly one QEMU, found {pids}"
    expected = [tap_name(VM, "lan0"), *([tap_name(VM, "lan1")] if shape.lan1 else [])]
    assert _taps(host) == set(expected), "a TAP per NIC, no other"
    assert _chains(host) == {f"{way}-{tap}" for tap in expected for way in ("in", "out")}
    assert set(host.leftover_processes()) == set(pids), "no process of ours but the QEMU"
    paths = StateLayout(host.state).vm(VM)
    assert {p.name for p in paths.run.iterdir() if p.name.endswith((".pid", ".sock"))} == \
        {paths.pidfile.name, paths.qmp.name, paths.events.name}, "no pidfile or socket but the live QEMU's"
    assert [p for p in host.state.rglob("*") if p.name.endswith((".partial", ".tmp"))] == []
    groups = _cgroups(host)
    if CGROUPS.is_dir():
        assert len(groups) == 1 and str(pids[0]) in (groups[0] / "cgroup.procs").read_text().split()
    compared = subprocess.run(["qemu-img", "compare", "-U", str(host.disk(VM, "keep")), str(base_image)],
                              capture_output=True, text=True, check=False)
    assert compared.returncode == 0, f"the keep disk changed: {compared.stdout}{compared.stderr}"
    return pids[0]


@dataclass(frozen=True)
class Change:
    what: str
    shape: Shape
    step: str
    seen: Callable[[Report], bool]
    restart: bool = False


CHAIN = [
    Change("disk added", Shape(extra=16), "hotplug-disk", lambda r: r.disks.get("vdc") == 16 * MiB),
    Change("disk grown", Shape(extra=32), "grow-disk-live", lambda r: r.disks.get("vdc") == 32 * MiB),
    Change("NIC added", Shape(extra=32, lan1=True), "hotplug-nic",
           lambda r: ("52:54:00:cc:00:02", "up") in r.nics.values()),
    Change("firewall rule", Shape(extra=32, lan1=True, drop_icmp=True), "apply-firewall", lambda r: True),
    Change("network added", Shape(extra=32, lan1=True, drop_icmp=True, lan2=True), "ensure-bridge", lambda r: True),
    Change("restart", Shape(extra=32, lan1=True, drop_icmp=True, lan2=True, queues=2), "stop",
           lambda r: r.disks.get("vdc") == 32 * MiB and len(r.nics) == 2, restart=True),
]
# Killed before its step, a live change has done nothing; after it, it is done but not yet reported. The
# "before" chain kills the restart before its start (the stop done); the "after" chain also kills a disk
# add right after the record is written (the record says more than the host has).
POINTS = {
    "before": {"restart": "before:start"},
    "after": {"disk added": "after:write-record"},
}


@pytest.mark.parametrize("moment", ["before", "after"])
def test_live_changes_restart_and_network_interrupted_at_each_step_converge(net_host: Host, moment: str) -> None:
    host = net_host
    base_image = _pattern_image(host)
    _manifests(host, base_image, Shape())
    host.apply()
    guest = host.guest(VM)
    guest.wait_report(lambda r: {"vda", "vdb"} <= set(r.disks), what="boot")
    pid = _check_no_leak(host, Shape(), base_image)
    boot = 1

    for change in CHAIN:
        _manifests(host, base_image, change.shape)
        point = POINTS[moment].get(change.what, f"{moment}:{change.step}")
        extra = ("--allow-restart",) if change.restart else ()
        crashed = host.cli("apply", str(host.manifests), "--yes", *extra, env=host.env(**{CRASH_ENV: point}))
        assert crashed.returncode == -9, f"{change.what}: apply did not reach {point}: {crashed.stdout}"
        host.apply(*extra)
        boot += change.restart
        guest.wait_report(change.seen, what=f"{change.what} (killed at {point})", boot=boot)
        assert host.plan_exit() == 0, f"{change.what}: plan not empty after the re-run"
        now = _check_no_leak(host, change.shape, base_image)
        assert (now != pid) == change.restart, f"{change.what}: QEMU restarted only for the restart"
        pid = now
    assert "br-lan2" in in_netns(host.netns or "", "ip", "-br", "link").stdout

    for name in ("vm.yaml", "net.yaml", "net2.yaml"):
        (host.manifests / name).unlink()
    host.apply("--allow-empty")
    assert host.leftover_processes() == [] and _taps(host) == set() and _chains(host) == set()
    assert "br-lan" not in in_netns(host.netns or "", "ip", "-br", "link").stdout
    assert not (host.state / "vms" / VM).exists() and _cgroups(host) == []
