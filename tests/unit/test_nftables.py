"""The rendered rulesets: properties every table we install must have, whatever the manifests say."""

from __future__ import annotations

from reconciler.hostnet.nftables import (
    HostCapabilities,
    NicFirewall,
    RoutedNetwork,
    build_ruleset,
    firewall_table,
)
from reconciler.spec.models import FirewallRule, FirewallSpec

ACCEPTING = FirewallSpec(default="accept", rules=[FirewallRule(direction="both", action="accept", protocol="tcp",
                                                               ports="22")])
NICS = [
    NicFirewall(vm="z", nic="lan0", tap="inzzzz", mac="52:54:00:00:00:02", ips=("10.77.0.12",), firewall=ACCEPTING),
    NicFirewall(vm="a", nic="lan0", tap="inzaaa", mac="52:54:00:00:00:01", ips=("10.77.0.11", "fd00::11")),
]
NETWORKS = [RoutedNetwork(name="a-nat", bridge="br-nat", subnet="10.1.0.0/24", nat=True, isolated=False),
            RoutedNetwork(name="b-iso", bridge="br-iso", subnet="10.2.0.0/24", nat=False, isolated=True)]


def _ruleset(**kwargs):  # type: ignore[no-untyped-def]
    return build_ruleset(NICS, NETWORKS, HostCapabilities(), table=firewall_table("/var/lib/infinization"),
                         **kwargs)


def test_no_rule_of_ours_accepts_and_base_chains_accept_by_policy() -> None:
    ruleset = _ruleset(loopback_uid=995)
    assert not [r.text for r in ruleset.rules if r.text.split()[-1] == "accept"]
    script = ruleset.script()
    assert "policy drop" not in script and script.count("policy accept;") == 6


def test_senders_chains_come_before_receivers_chains() -> None:
    forward = [r.text for r in _ruleset().rules if r.family == "bridge" and r.chain == "forward"]
    kinds = [text.split()[0] for text in forward]
    assert kinds == sorted(kinds, key=lambda k: k != "iifname"), forward


def test_isolation_drops_come_before_nat_returns() -> None:
    forward = [r.text for r in _ruleset().rules if r.family == "ip" and r.chain == "forward"]
    assert [text.split()[-1] for text in forward] == ["drop", "drop", "return", "return"]


def test_each_state_directory_has_its_own_tables_and_touches_no_other() -> None:
    one, two = firewall_table("/var/lib/infinization"), firewall_table("/srv/other")
    assert one != two and one.startswith("infz-") and len(one) == 13
    script = _ruleset().script()
    assert two not in script and "infinization" not in script
    assert "delete table bridge infinization" in _ruleset(legacy=True).script()


def test_ethertypes_tags_and_router_advertisements() -> None:
    texts = {r.summary: r.text for r in _ruleset().rules}
    assert texts["z/lan0 anti-spoofing only ip+arp"] == "ether type != { ip, arp } drop"
    assert texts["a/lan0 anti-spoofing only ip+arp+ip6"] == "ether type != { ip, arp, ip6 } drop"
    assert texts["z/lan0 anti-spoofing vlan-tagged"] == "ether type { 0x8100, 0x88a8 } drop"
    no_ips = NicFirewall(vm="n", nic="lan0", tap="inznnn", mac="52:54:00:00:00:03",
                         firewall=FirewallSpec(antiSpoofing=False))
    rules = build_ruleset([no_ips], [], HostCapabilities(), table="t").rules
    assert [r.summary for r in rules if "anti-spoofing" in r.summary] == []
    assert "n/lan0 no router advertisements" in [r.summary for r in rules]


def test_loopback_rules_only_with_the_qemu_uid() -> None:
    assert not [r for r in _ruleset().rules if r.family == "inet"]
    inet = [r.text for r in _ruleset(loopback_uid=995).rules if r.family == "inet"]
    assert "meta skuid 995 ip daddr 127.0.0.0/8 ct state new reject" in inet
    assert "meta skuid 995 ip6 daddr ::1 ct state new reject" in inet


def test_no_rules_no_tables() -> None:
    script = build_ruleset([], [], HostCapabilities(), table="infz-00000000").script()
    assert "delete table inet infz-00000000" in script and "chain" not in script
