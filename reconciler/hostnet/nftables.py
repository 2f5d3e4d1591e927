"""Render the nftables rulesets Infinization owns, as text for one atomic ``nft -f -`` transaction.

Two tables, both replaced whole on every change (so a rule flushed or edited by hand comes back, and
nothing half-applied can stay):

- ``bridge infinization``: per-NIC filtering of bridged traffic. Base chains ``forward`` (guest to guest
  and to the uplink), ``input`` (guest to host) and ``output`` (host to guest) jump to two chains per TAP:
  ``out-TAP`` (traffic the guest sends: anti-spoofing first) and ``in-TAP`` (traffic to the guest).
- ``ip infinization``: masquerade for NAT networks and forwarding policy (NAT: out and replies only;
  isolated: nothing forwarded).

Every rule carries a comment ``infz:HASH summary``; the observer reads the comments back, so drift
(a rule missing, changed or added by hand) is a set difference, and the plan can name each rule.
Called by the planner (to diff) and the executor (to apply).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

from reconciler.errors import Permanent
from reconciler.spec.models import FirewallRule, FirewallSpec

BRIDGE_TABLE = "infinization"
IP_TABLE = "infinization"
_SAFE_COMMENT = re.compile(r"[^A-Za-z0-9 ,./:_=+-]")


@dataclass(frozen=True)
class NicFirewall:
    """One bridged NIC's filtering needs."""

    vm: str
    nic: str
    tap: str
    mac: str
    ips: tuple[str, ...] = ()
    firewall: FirewallSpec = field(default_factory=FirewallSpec)


@dataclass(frozen=True)
class RoutedNetwork:
    name: str
    bridge: str
    subnet: str
    nat: bool
    isolated: bool


@dataclass(frozen=True)
class Rule:
    """One rendered rule: where it goes, its nft text, and the comment that identifies it."""

    family: str
    chain: str
    text: str
    summary: str

    @property
    def comment(self) -> str:
        digest = hashlib.sha256(f"{self.family}/{self.chain}/{self.text}".encode()).hexdigest()[:10]
        return _SAFE_COMMENT.sub("_", f"infz:{digest} {self.summary}")[:120]

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.family, self.chain, self.comment.split(" ", 1)[0])

    def render(self) -> str:
        return f'{self.text} comment "{self.comment}"'


class HostCapabilities(BaseModel):
    """What this host's kernel and devices support (probed once per process by the observer): nftables
    conntrack and reject in the bridge family, and vhost-net. One model for the observed facts and for the
    ruleset builder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bridge_conntrack: bool = True
    bridge_reject: bool = True
    vhost_net: bool = False


class UnsupportedRule(Permanent, ValueError):
    """A rule needs a kernel feature this host lacks; the message says which and what to use instead."""


def _match(rule: FirewallRule) -> str:
    parts = []
    family = None
    for cidr in (rule.source, rule.destination):
        if cidr is not None:
            family = ipaddress.ip_network(cidr).version
    if rule.protocol in ("tcp", "udp"):
        parts.append(f"meta l4proto {rule.protocol}")
        if rule.ports:
            parts.append("th dport { " + ", ".join(rule.ports.split(",")) + " }")
    elif rule.protocol == "icmp":
        parts.append("meta l4proto icmp")
    elif rule.protocol == "icmpv6":
        parts.append("meta l4proto ipv6-icmp")
    prefix = "ip6" if family == 6 else "ip"
    if rule.source:
        parts.append(f"{prefix} saddr {rule.source}")
    if rule.destination:
        parts.append(f"{prefix} daddr {rule.destination}")
    if rule.state:
        parts.append("ct state { " + ", ".join(rule.state) + " }")
    return " ".join(parts)


def _describe(rule: FirewallRule) -> str:
    words: list[str] = [rule.action, rule.protocol]
    if rule.ports:
        words.append(f"ports {rule.ports}")
    if rule.source:
        words.append(f"from {rule.source}")
    if rule.destination:
        words.append(f"to {rule.destination}")
    if rule.state:
        words.append("state " + "+".join(rule.state))
    return " ".join(words)


def _verdict(action: str, direction: str) -> str:
    """The sender's 'accept' only means 'return': the packet must still pass the receiver's in-chain,
    which the base chain jumps to next (an 'accept' would end the whole hook there)."""
    return "return" if action == "accept" and direction == "out" else action


def nic_rules(nic: NicFirewall, caps: HostCapabilities) -> list[Rule]:
    """The rules of one NIC's two chains, in order.

    :raise UnsupportedRule: When a rule needs bridge conntrack or reject and the kernel has neither.
    """
    out_chain, in_chain = f"out-{nic.tap}", f"in-{nic.tap}"
    who = f"{nic.vm}/{nic.nic}"
    rules: list[Rule] = []
    if nic.firewall.antiSpoofing:
        rules.append(Rule("bridge", out_chain, f"ether saddr != {nic.mac} drop", f"{who} anti-spoofing mac"))
        v4 = [ip for ip in nic.ips if ipaddress.ip_address(ip).version == 4]
        v6 = [ip for ip in nic.ips if ipaddress.ip_address(ip).version == 6]
        if v4:
            # A DHCP client has no address yet: let its DISCOVER/REQUEST (from 0.0.0.0) through.
            rules.append(Rule("bridge", out_chain, "ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 "
                              "udp dport 67 return", f"{who} dhcp client"))
            rules.append(Rule("bridge", out_chain, "arp saddr ip != { " + ", ".join(v4) + " } drop",
                              f"{who} anti-spoofing arp"))
            rules.append(Rule("bridge", out_chain, "meta protocol ip ip saddr != { " + ", ".join(v4) + " } drop",
                              f"{who} anti-spoofing ipv4"))
        if v6:
            rules.append(Rule("bridge", out_chain, "meta protocol ip6 ip6 saddr != { " + ", ".join(v6) + " } drop",
                              f"{who} anti-spoofing ipv6"))
    ordered = sorted(enumerate(nic.firewall.rules), key=lambda pair: (pair[1].priority, pair[0]))
    for chain, direction in ((out_chain, "out"), (in_chain, "in")):
        # ARP always passes (after anti-spoofing): without it no IP traffic works, whatever the rules say.
        rules.append(Rule("bridge", chain, f"ether type arp {_verdict('accept', direction)}", f"{who} {direction} arp"))
        for index, rule in ordered:
            if rule.direction not in (direction, "both"):
                continue
            if rule.state and not caps.bridge_conntrack:
                raise UnsupportedRule(f"{who} rule {index + 1}: 'state' needs connection tracking for bridged "
                                      "traffic (nf_conntrack_bridge), which this host's kernel lacks")
            if rule.action == "reject" and not caps.bridge_reject:
                raise UnsupportedRule(f"{who} rule {index + 1}: 'reject' needs nft_reject_bridge, which this "
                                      "host's kernel lacks; use drop")
            text = " ".join(filter(None, [_match(rule), _verdict(rule.action, direction)]))
            rules.append(Rule("bridge", chain, text, f"{who} {direction} {index + 1}: {_describe(rule)}"))
        rules.append(Rule("bridge", chain, _verdict(nic.firewall.default, direction),
                          f"{who} {direction} default {nic.firewall.default}"))
    return rules


def network_rules(networks: list[RoutedNetwork]) -> list[Rule]:
    rules = []
    for net in networks:
        if net.nat:
            rules.append(Rule("ip", "postrouting", f"ip saddr {net.subnet} ip daddr != {net.subnet} masquerade",
                              f"network {net.name} nat"))
            rules.append(Rule("ip", "forward", f'iifname "{net.bridge}" accept', f"network {net.name} out"))
            rules.append(Rule("ip", "forward", f'oifname "{net.bridge}" ip daddr {net.subnet} accept',
                              f"network {net.name} replies"))
        if net.isolated:
            rules.append(Rule("ip", "forward", f'iifname "{net.bridge}" drop', f"network {net.name} isolated out"))
            rules.append(Rule("ip", "forward", f'oifname "{net.bridge}" drop', f"network {net.name} isolated in"))
    return rules


@dataclass(frozen=True)
class Ruleset:
    nics: tuple[NicFirewall, ...]
    rules: tuple[Rule, ...]

    def by_key(self) -> dict[str, Rule]:
        """'family/chain/infz:HASH' -> rule: the same keys the observer reads back from nft."""
        return {"/".join(rule.key): rule for rule in self.rules}

    def script(self) -> str:
        """Replace both tables in one transaction (creating them first makes the delete always valid)."""
        lines = [f"table bridge {BRIDGE_TABLE} {{}}", f"delete table bridge {BRIDGE_TABLE}",
                 f"table ip {IP_TABLE} {{}}", f"delete table ip {IP_TABLE}"]
        for family, table in (("bridge", BRIDGE_TABLE), ("ip", IP_TABLE)):
            lines.append(f"table {family} {table} {{")
            chains = list(BASE_CHAINS[family])
            chains += [c for c in dict.fromkeys(r.chain for r in self.rules if r.family == family) if c not in chains]
            for chain in chains:
                lines.append(f"  chain {chain} {{")
                if chain in BASE_CHAINS[family]:
                    lines.append(f"    {BASE_CHAINS[family][chain]}")
                lines += [f"    {r.render()}" for r in self.rules if r.family == family and r.chain == chain]
                lines.append("  }")
            lines.append("}")
        return "\n".join(lines) + "\n"


BASE_CHAINS = {
    "bridge": {
        "forward": "type filter hook forward priority 0; policy accept;",
        "input": "type filter hook input priority 0; policy accept;",
        "output": "type filter hook output priority 0; policy accept;",
    },
    "ip": {
        "postrouting": "type nat hook postrouting priority 100; policy accept;",
        "forward": "type filter hook forward priority 0; policy accept;",
    },
}


def _jumps(nic: NicFirewall) -> list[Rule]:
    who = f"{nic.vm}/{nic.nic}"
    out_chain, in_chain = f"out-{nic.tap}", f"in-{nic.tap}"
    return [
        Rule("bridge", "forward", f'iifname "{nic.tap}" jump {out_chain}', f"{who} from guest"),
        Rule("bridge", "forward", f'oifname "{nic.tap}" jump {in_chain}', f"{who} to guest"),
        Rule("bridge", "input", f'iifname "{nic.tap}" jump {out_chain}', f"{who} guest to host"),
        Rule("bridge", "output", f'oifname "{nic.tap}" jump {in_chain}', f"{who} host to guest"),
    ]


def build_ruleset(nics: list[NicFirewall], networks: list[RoutedNetwork], caps: HostCapabilities) -> Ruleset:
    """Everything, in a deterministic order.

    :raise UnsupportedRule: See ``nic_rules``.
    """
    ordered = sorted(nics, key=lambda n: (n.vm, n.nic))
    rules = [rule for nic in ordered for rule in _jumps(nic)]
    rules += [rule for nic in ordered for rule in nic_rules(nic, caps)]
    rules += network_rules(sorted(networks, key=lambda n: n.name))
    return Ruleset(tuple(ordered), tuple(rules))
