"""Render the nftables rulesets Infinization owns, as text for one atomic ``nft -f -`` transaction.

One table per family, named after the state directory (``firewall_table``: ``infz-`` + 8 hex), so two
instances on one host never see or replace each other's rules. All of them are replaced whole on every
change (a rule flushed or edited by hand comes back, and nothing half-applied can stay):

- ``bridge``: per-NIC filtering of bridged traffic. Base chains ``forward`` (guest to guest and to the
  uplink), ``input`` (guest to host) and ``output`` (host to guest) jump to two chains per TAP: ``out-TAP``
  (traffic the guest sends: anti-spoofing first) and ``in-TAP`` (traffic to the guest).
- ``ip``: masquerade for NAT networks and isolation (isolated: nothing forwarded).
- ``inet``: the ``output`` hook, where user-mode NICs (QEMU's own sockets, by its uid) are kept off the
  host's loopback.

Base chains have policy accept and their rules (and the chains they jump to) only drop, reject or
return: nftables ends only the current table's evaluation on ``accept``, and every other table at the hook
(the host's firewall, another instance's) still decides, so nothing here opens what another table closes,
and within a table every NIC's chain on a packet's path is evaluated.

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

LEGACY_TABLE = "infinization"  # the one table every instance shared before tables were per state directory
FAMILIES = ("bridge", "ip", "inet")
_SAFE_COMMENT = re.compile(r"[^A-Za-z0-9 ,./:_=+-]")


@dataclass(frozen=True)
class NicFirewall:
    """One bridged NIC's filtering needs."""

    vm: str
    nic: str
    tap: str
    mac: str
    ips: tuple[str, ...] = ()
    ipv6: bool = False  # IPv6 allowed without a declared IPv6 address (SLAAC)
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


def _verdict(action: str) -> str:
    """'accept' is rendered 'return': the packet must still pass the other NIC's chain, which the base
    chain jumps to next (an 'accept' would end the whole base chain there). Base chains have policy accept,
    so a packet nobody drops passes our tables; another table (the host's, another state directory's)
    still decides for itself: nothing we render can open what it closes."""
    return "return" if action == "accept" else action


def _anti_spoofing(nic: NicFirewall, chain: str) -> list[Rule]:
    """What the guest may send at all: its MAC, untagged frames, only the ethertypes its addresses need
    (when it declares ``ips``), and only from those addresses."""
    who = f"{nic.vm}/{nic.nic}"
    rules = [Rule("bridge", chain, f"ether saddr != {nic.mac} drop", f"{who} anti-spoofing mac"),
             # ``ether type`` sees the tag, not what it carries: a tagged frame would pass every match below.
             Rule("bridge", chain, "ether type { 0x8100, 0x88a8 } drop", f"{who} anti-spoofing vlan-tagged")]
    v4 = [ip for ip in nic.ips if ipaddress.ip_address(ip).version == 4]
    v6 = [ip for ip in nic.ips if ipaddress.ip_address(ip).version == 6]
    if nic.ips:
        allowed = ["ip", "arp"] if v4 else []
        allowed += ["ip6"] if v6 or nic.ipv6 else []
        rules.append(Rule("bridge", chain, "ether type != { " + ", ".join(allowed) + " } drop",
                          f"{who} anti-spoofing only " + "+".join(allowed)))
    if v4:
        # A DHCP client has no address yet: let its DISCOVER/REQUEST (from 0.0.0.0) through.
        rules.append(Rule("bridge", chain, "ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 "
                          "udp dport 67 return", f"{who} dhcp client"))
        rules.append(Rule("bridge", chain, "arp saddr ip != { " + ", ".join(v4) + " } drop",
                          f"{who} anti-spoofing arp"))
        rules.append(Rule("bridge", chain, "meta protocol ip ip saddr != { " + ", ".join(v4) + " } drop",
                          f"{who} anti-spoofing ipv4"))
    if v6:
        # Duplicate address detection sends from ::, neighbour discovery from the link-local address.
        rules.append(Rule("bridge", chain, "meta protocol ip6 ip6 saddr != { ::, fe80::/10, " + ", ".join(v6)
                          + " } drop", f"{who} anti-spoofing ipv6"))
    return rules


def nic_rules(nic: NicFirewall, caps: HostCapabilities) -> list[Rule]:
    """The rules of one NIC's two chains, in order. Every verdict is drop, reject or return (never accept):
    an accept would end the base chain and skip the other NIC's chain.

    :raise UnsupportedRule: When a rule needs bridge conntrack or reject and the kernel has neither.
    """
    out_chain, in_chain = f"out-{nic.tap}", f"in-{nic.tap}"
    who = f"{nic.vm}/{nic.nic}"
    rules: list[Rule] = _anti_spoofing(nic, out_chain) if nic.firewall.antiSpoofing else []
    # A guest is never a router for the host or its neighbours (with or without anti-spoofing).
    rules.append(Rule("bridge", out_chain, "icmpv6 type { nd-router-advert, nd-redirect } drop",
                      f"{who} no router advertisements"))
    ordered = sorted(enumerate(nic.firewall.rules), key=lambda pair: (pair[1].priority, pair[0]))
    for chain, direction in ((out_chain, "out"), (in_chain, "in")):
        # ARP always passes (after anti-spoofing): without it no IP traffic works, whatever the rules say.
        rules.append(Rule("bridge", chain, f"ether type arp {_verdict('accept')}", f"{who} {direction} arp"))
        for index, rule in ordered:
            if rule.direction not in (direction, "both"):
                continue
            if rule.state and not caps.bridge_conntrack:
                raise UnsupportedRule(f"{who} rule {index + 1}: 'state' needs connection tracking for bridged "
                                      "traffic (nf_conntrack_bridge), which this host's kernel lacks")
            if rule.action == "reject" and not caps.bridge_reject:
                raise UnsupportedRule(f"{who} rule {index + 1}: 'reject' needs nft_reject_bridge, which this "
                                      "host's kernel lacks; use drop")
            text = " ".join(filter(None, [_match(rule), _verdict(rule.action)]))
            rules.append(Rule("bridge", chain, text, f"{who} {direction} {index + 1}: {_describe(rule)}"))
        rules.append(Rule("bridge", chain, _verdict(nic.firewall.default),
                          f"{who} {direction} default {nic.firewall.default}"))
    return rules


def network_rules(networks: list[RoutedNetwork]) -> list[Rule]:
    """NAT and isolation. Isolation drops come first: a 'return' ends the base chain (policy accept), so a
    drop after it would never see a packet from a NAT bridge into an isolated one."""
    rules = []
    for net in networks:
        if net.isolated:
            rules.append(Rule("ip", "forward", f'iifname "{net.bridge}" drop', f"network {net.name} isolated out"))
            rules.append(Rule("ip", "forward", f'oifname "{net.bridge}" drop', f"network {net.name} isolated in"))
    for net in networks:
        if net.nat:
            rules.append(Rule("ip", "postrouting", f"ip saddr {net.subnet} ip daddr != {net.subnet} masquerade",
                              f"network {net.name} nat"))
            rules.append(Rule("ip", "forward", f'iifname "{net.bridge}" return', f"network {net.name} out"))
            rules.append(Rule("ip", "forward", f'oifname "{net.bridge}" ip daddr {net.subnet} return',
                              f"network {net.name} replies"))
    return rules


def loopback_rules(uid: int) -> list[Rule]:
    """User-mode NICs: slirp's connections are QEMU's own sockets, so the guest reaches whatever QEMU's
    user can. No new connection from that user to the host's loopback (10.0.2.2 is the host's 127.0.0.1);
    replies on established connections (hostfwd) pass, and DNS (slirp forwards the guest's queries to the
    host's resolver, which may listen on loopback)."""
    rules = []
    for family, loopback in (("ip", "127.0.0.0/8"), ("ip6", "::1")):
        match = f"meta skuid {uid} {family} daddr {loopback}"
        rules.append(Rule("inet", "output", f"{match} meta l4proto {{ tcp, udp }} th dport 53 return",
                          f"qemu user: dns on {loopback}"))
        rules.append(Rule("inet", "output", f"{match} ct state new reject",
                          f"qemu user: no new connections to {loopback}"))
    return rules


@dataclass(frozen=True)
class Ruleset:
    table: str
    nics: tuple[NicFirewall, ...]
    rules: tuple[Rule, ...]
    legacy: bool = False  # the shared table of older versions is still there: delete it

    def by_key(self) -> dict[str, Rule]:
        """'family/chain/infz:HASH' -> rule: the same keys the observer reads back from nft."""
        return {"/".join(rule.key): rule for rule in self.rules}

    def script(self) -> str:
        """Replace our tables in one transaction (creating them first makes the delete always valid); with no
        rules, just delete them."""
        lines = []
        for family in FAMILIES:
            lines += [f"table {family} {self.table} {{}}", f"delete table {family} {self.table}"]
        if self.legacy:
            lines += [f"table {family} {LEGACY_TABLE} {{}}\ndelete table {family} {LEGACY_TABLE}"
                      for family in ("bridge", "ip")]
        if not self.rules:  # nothing to filter: no tables (a state directory emptied leaves nothing behind)
            return "\n".join(lines) + "\n"
        for family in FAMILIES:
            lines.append(f"table {family} {self.table} {{")
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


# Every base chain has policy accept and its rules only drop, reject or return (see ``_verdict``).
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
    "inet": {
        "output": "type filter hook output priority 0; policy accept;",
    },
}


def firewall_table(state_dir: str) -> str:
    """Our tables' name (the same in each family): one set of tables per state directory (its resolved
    path), so two instances never read or replace each other's rules."""
    return "infz-" + hashlib.sha256(state_dir.encode()).hexdigest()[:8]


def _jumps(nic: NicFirewall) -> tuple[list[Rule], list[Rule]]:
    """The base chains' jumps into one NIC's chains: (from the guest, to the guest)."""
    who = f"{nic.vm}/{nic.nic}"
    out_chain, in_chain = f"out-{nic.tap}", f"in-{nic.tap}"
    return ([Rule("bridge", "forward", f'iifname "{nic.tap}" jump {out_chain}', f"{who} from guest"),
             Rule("bridge", "input", f'iifname "{nic.tap}" jump {out_chain}', f"{who} guest to host")],
            [Rule("bridge", "forward", f'oifname "{nic.tap}" jump {in_chain}', f"{who} to guest"),
             Rule("bridge", "output", f'oifname "{nic.tap}" jump {in_chain}', f"{who} host to guest")])


def build_ruleset(nics: list[NicFirewall], networks: list[RoutedNetwork], caps: HostCapabilities, *,
                  table: str, loopback_uid: int | None = None, legacy: bool = False) -> Ruleset:
    """Everything, in a deterministic order: the senders' chains are jumped to before the receivers'.
    ``loopback_uid``: QEMU's uid, when user-mode NICs must be kept off the host's loopback.

    :raise UnsupportedRule: See ``nic_rules``.
    """
    ordered = sorted(nics, key=lambda n: (n.vm, n.nic))
    jumps = [_jumps(nic) for nic in ordered]
    rules = [rule for senders, _ in jumps for rule in senders] + [rule for _, receivers in jumps for rule in receivers]
    rules += [rule for nic in ordered for rule in nic_rules(nic, caps)]
    rules += network_rules(sorted(networks, key=lambda n: n.name))
    rules += loopback_rules(loopback_uid) if loopback_uid is not None else []
    return Ruleset(table, tuple(ordered), tuple(rules), legacy)
