"""The sync daemon between resyncs (issue 13): host facts are kept between events, so the events must be
what brings a change in. With the resync an hour away, on one bridged VM in its own network namespace:

- a disk grown in the manifest reaches the guest (the edit path: changed file only, cached records);
- ``nft flush ruleset`` is repaired (only ``nft monitor`` can have told the daemon: no resync runs);
- a TAP deleted is repaired, and an edit after that still reaches the guest (netlink made the daemon drop
  the links it kept: a VM reconcile planning on the old ones would not recreate the TAP);
- a manifest moved into a new subdirectory (a directory event: everything is read again) changes nothing.
"""

from __future__ import annotations

from reconciler.spec.models import tap_name
from tests.e2e.harness import GUEST_DIR, Host, in_netns

MiB = 1024**2
TAP = tap_name("ev", "lan0")
NETWORK = """apiVersion: infinization.io/v1alpha1
kind: Network
metadata: {name: lan}
spec: {bridge: br-ev, address: 10.78.0.1/24}
"""


def _vm(size: int) -> str:
    return f"""apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {{name: ev}}
spec:
  machine: {{type: q35, accel: tcg}}
  memory: {{size: 256Mi}}
  terminationGracePeriodSeconds: 3
  boot: {{kernel: {GUEST_DIR}/vmlinuz, initrd: {GUEST_DIR}/initrd.img, cmdline: "console=ttyS0 panic=-1"}}
  disks:
    - {{name: root, size: {size}Mi}}
  networks:
    - name: lan0
      type: bridge
      network: lan
      firewall: {{default: accept, rules: [{{direction: in, action: drop, protocol: icmp}}]}}
"""


def _ready(host: Host) -> bool:
    status = host.stored_status("ev")
    return status is not None and "Ready" in status.conditions


def _netns(host: Host, *argv: str) -> str:
    return in_netns(host.netns or "", *argv, check=False).stdout


def test_between_resyncs_events_bring_every_change_in(net_host: Host) -> None:
    host = net_host
    host.write("net.yaml", NETWORK)
    host.write("ev.yaml", _vm(32))
    daemon = host.start_sync("--resync-interval", "3600")
    try:
        host.wait_for(lambda: _ready(host), "the VM Ready", timeout=300)  # a loaded CI machine: start + boot
        guest = host.guest("ev")
        first = guest.wait_report(lambda r: r.disks.get("vda") == 32 * MiB, what="boot", timeout=120)
        pid = host.running_pid("ev")

        host.write("ev.yaml", _vm(40))
        seen = guest.wait_report(lambda r: r.disks.get("vda") == 40 * MiB, after_seq=first.seq, what="40Mi")

        assert f"in-{TAP}" in _netns(host, "nft", "list", "ruleset")
        _netns(host, "nft", "flush", "ruleset")
        host.wait_for(lambda: f"in-{TAP}" in _netns(host, "nft", "list", "ruleset"),
                      "the firewall put back without a resync", timeout=60)

        _netns(host, "ip", "link", "set", TAP, "nomaster")
        host.wait_for(lambda: "master br-ev" in _netns(host, "ip", "-o", "link", "show", TAP),
                      "the TAP put back on its bridge without a resync", timeout=60)
        host.write("ev.yaml", _vm(48))
        guest.wait_report(lambda r: r.disks.get("vda") == 48 * MiB, after_seq=seen.seq, what="48Mi")

        host.wait_for(lambda: _ready(host), "the VM Ready again")
        assert host.running_pid("ev") == pid, "nothing of this needed a restart"
        assert host.stop_sync(daemon) == 0
        daemon = None
        assert host.plan_exit() == 0, host.cli("plan", str(host.manifests)).stdout
    finally:
        if daemon is not None:
            host.stop_sync(daemon)
