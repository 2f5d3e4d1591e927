"""Which link events wake which of the sync daemon's keys (runtime.links): only its own bridges and TAPs
(pure)."""

from __future__ import annotations

from reconciler.runtime.links import link_keys, woken
from reconciler.spec.models import Network, VirtualMachine, tap_name


def _vm(name: str, nics: list[dict[str, str]]) -> VirtualMachine:
    return VirtualMachine.model_validate({"apiVersion": "infinization.io/v1alpha1", "kind": "VirtualMachine",
                                          "metadata": {"name": name}, "spec": {"networks": nics}})


def _net(name: str, bridge: str) -> Network:
    return Network.model_validate({"apiVersion": "infinization.io/v1alpha1", "kind": "Network",
                                   "metadata": {"name": name}, "spec": {"bridge": bridge}})


def test_a_tap_wakes_its_vm_a_bridge_the_host_and_nothing_else_wakes_anything() -> None:
    web = _vm("web", [{"name": "lan", "type": "bridge", "network": "lan"},
                      {"name": "own", "type": "bridge", "bridge": "br-own"}])
    db = _vm("db", [{"name": "old", "type": "bridge", "network": "old"}])
    keys = link_keys([web, db], {"lan": _net("lan", "br-lan")}, {"old": _net("old", "br-old")}, "@host")
    assert woken([tap_name("web", "lan")], keys) == ["web"]
    assert woken([tap_name("db", "old")], keys) == ["db"]
    for bridge in ("br-lan", "br-own", "br-old"):  # desired, named by a NIC, created and still recorded
        assert woken([bridge], keys) == ["@host"], bridge
    assert woken(["veth1234", "docker0", "br-lan0", "eth0", "inz0000000000"], keys) == [], \
        "another program's interfaces (and another installation's TAP) wake nothing"
    assert woken(["eth0", tap_name("web", "own"), "br-lan"], keys) == ["@host", "web"], "ours in a batch"
