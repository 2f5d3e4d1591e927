"""Which link events wake the sync daemon (runtime.links): only its own bridges and TAPs (pure)."""

from __future__ import annotations

from reconciler.runtime.links import matters, our_links
from reconciler.spec.models import Network, VirtualMachine, tap_name


def _vm(nics: list[dict[str, str]]) -> VirtualMachine:
    return VirtualMachine.model_validate({"apiVersion": "infinization.io/v1alpha1", "kind": "VirtualMachine",
                                          "metadata": {"name": "web"}, "spec": {"networks": nics}})


def _net(name: str, bridge: str) -> Network:
    return Network.model_validate({"apiVersion": "infinization.io/v1alpha1", "kind": "Network",
                                   "metadata": {"name": name}, "spec": {"bridge": bridge}})


def test_our_bridges_and_taps_matter_and_nothing_else() -> None:
    vm = _vm([{"name": "lan", "type": "bridge", "network": "lan"}, {"name": "own", "type": "bridge",
                                                                    "bridge": "br-own"}])
    ours = our_links([vm], {"lan": _net("lan", "br-lan")}, {"old": _net("old", "br-old")})
    assert ours == {"br-lan", "br-own", "br-old", tap_name("web", "lan"), tap_name("web", "own")}
    for name in ("br-lan", "br-own", "br-old", tap_name("web", "lan"), None):
        assert matters([name], ours), name
    assert not matters(["veth1234", "docker0", "br-lan0", "eth0", tap_name("other", "lan")], ours), (
        "another installation's TAPs have the same prefix: not ours")
    assert matters(["eth0", "br-lan"], ours), "one of ours in a batch is enough"
