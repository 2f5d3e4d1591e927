"""Plan host networking: Networks (bridges), the nftables rulesets, and each bridged NIC's TAP.

Called by the planner. Pure. Work is ordered so that a bridge exists before a TAP joins it, a NIC's
firewall is in place before the NIC is connected (fail-closed: when the rules cannot be applied, VMs with
bridged NICs are not started or changed), and a Network is deleted only after, and only if, no VM uses it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.hostnet.dhcp import dnsmasq_argv
from reconciler.hostnet.nftables import (
    NicFirewall,
    RoutedNetwork,
    Ruleset,
    UnsupportedRule,
    build_ruleset,
    firewall_table,
)
from reconciler.plan import steps as s
from reconciler.plan.actions import Action, Change, FieldChange, Mode
from reconciler.plan.observed import ObservedState
from reconciler.plan.steps import Step
from reconciler.spec.models import FirewallSpec, Network, VirtualMachine, nic_bridge, nic_mac, tap_name
from reconciler.state import paths

FIREWALL = "nftables"


@dataclass
class NetworkPlan:
    first: list[Change] = field(default_factory=list)
    last: list[Change] = field(default_factory=list)
    blocked: dict[str, str] = field(default_factory=dict)  # VM name -> why it must wait


def plan_networks(
    networks: Mapping[str, Network], vms: Mapping[str, VirtualMachine], observed: ObservedState
) -> NetworkPlan:
    result = NetworkPlan()
    for name in sorted(networks):
        change = _ensure_network(networks[name], observed)
        if change is not None:
            result.first.append(change)
    firewall = _firewall(networks, vms, observed, result)
    if firewall is not None:
        result.first.append(firewall)
    for name in sorted(set(observed.network_records) - set(networks)):
        result.last.append(_delete_network(name, vms, observed))
    for vm in vms.values():
        for nic in vm.spec.networks:
            if nic.type != "bridge":
                continue
            bridge = nic_bridge(nic, networks)
            creating = any(c.name == nic.network and c.steps for c in result.first if c.resource == "Network")
            link = observed.host.links.get(bridge or "")
            if bridge is None or (link is None and not creating):
                result.blocked.setdefault(vm.name, f"NIC {nic.name}: bridge {bridge or nic.network} does not exist")
            elif link is not None and link.kind != "bridge":
                result.blocked.setdefault(vm.name, f"NIC {nic.name}: {bridge} is not a bridge")
    return result


def _refused(network: Network, why: str) -> Change:
    return Change.planned(resource="Network", name=network.name, action=Action.NOOP, refusals=[why])


def _network_refusal(network: Network, observed: ObservedState) -> str | None:
    """Why this Network's bridge cannot be managed by us, if it cannot."""
    spec, name = network.spec, network.name
    record = observed.network_records.get(name)
    link = observed.host.links.get(spec.bridge)
    if record is not None and record.network.spec.bridge != spec.bridge:
        # Renaming would leave our old bridge behind and could adopt (and later delete) someone else's.
        return (f"the bridge of Network {name} cannot be renamed ({record.network.spec.bridge} -> {spec.bridge}); "
                "create a new Network and move the NICs to it")
    if link is not None and record is None:
        return (f"bridge {spec.bridge} already exists and was not created by infinization; "
                f"use `bridge: {spec.bridge}` on the NICs instead of a Network")
    if link is not None and link.kind != "bridge":
        return f"{spec.bridge} exists and is a {link.kind}, not a bridge"
    return None


def _bridge_drift(network: Network, observed: ObservedState) -> tuple[list[str], str | None]:
    """What differs between the Network and its bridge, and an address that is no longer wanted on it."""
    spec = network.spec
    record = observed.network_records.get(network.name)
    link = observed.host.links.get(spec.bridge)
    reasons: list[str] = []
    if link is None:
        reasons.append("new network" if record is None else f"drift: bridge {spec.bridge} is missing")
    else:
        if not link.up:
            reasons.append(f"drift: bridge {spec.bridge} is down")
        if spec.address and spec.address not in link.addresses:
            reasons.append(f"address {spec.address} is missing on {spec.bridge}")
        if link.ipv6_slaac and not spec.ipv6:
            reasons.append(f"drift: bridge {spec.bridge} accepts IPv6 router advertisements (accept_ra/autoconf "
                           "on; the Network does not ask for ipv6)")
    old_address = record.network.spec.address if record else None
    remove = old_address if old_address and old_address != spec.address else None
    if remove and link is not None and remove in link.addresses:
        reasons.append(f"address {remove} is no longer wanted on {spec.bridge}")
    if spec.nat and not observed.host.ip_forward:
        reasons.append("NAT needs net.ipv4.ip_forward=1")
    return reasons, remove


def _ensure_network(network: Network, observed: ObservedState) -> Change | None:
    spec, name = network.spec, network.name
    if (why := _network_refusal(network, observed)) is not None:
        return _refused(network, why)
    record = observed.network_records.get(name)
    reasons, remove = _bridge_drift(network, observed)
    dhcp_steps = _dhcp_steps(network, observed)
    if not reasons and not dhcp_steps and record is not None and record.network == network:
        return None
    steps: list[Step] = [s.WriteNetworkRecord(name=name, summary="record the network as ours", network=network)]
    if reasons:
        steps.append(s.EnsureBridge(
            name=name, summary=f"bridge {spec.bridge}: create or repair (up, {spec.address or 'no address'})",
            bridge=spec.bridge, address=spec.address, remove_address=remove, ip_forward=spec.nat, ipv6=spec.ipv6))
    steps += dhcp_steps
    fields = []
    if record is not None and record.network != network:
        fields = [FieldChange(path="spec", before=record.network.spec.model_dump(mode="json"),
                              after=spec.model_dump(mode="json"), mode=Mode.LIVE, how="bridge and nftables")]
    return Change.planned(resource="Network", name=name, action=Action.CREATE if record is None else Action.UPDATE,
                          reasons=reasons, fields=fields, steps=steps)


def _dhcp_steps(network: Network, observed: ObservedState) -> list[Step]:
    """Start, restart (its arguments changed) or stop the Network's dnsmasq."""
    running = observed.host.dhcp.get(network.name)
    current = running.argv if running else None
    pidfile = paths.dhcp_pidfile(observed.state_dir, network.name)
    if network.spec.dhcp is None:
        return [] if current is None else [_stop_dhcp(network.name, pidfile)]
    wanted = dnsmasq_argv(network, pidfile, paths.dhcp_leases(observed.state_dir, network.name))
    if current == wanted:
        return []
    what = "start" if current is None else "restart (its settings changed)"
    return [s.EnsureDhcp(name=network.name, summary=f"DHCP: {what} dnsmasq on {network.spec.bridge}",
                         argv=wanted, pidfile=pidfile)]


def _stop_dhcp(name: str, pidfile: str) -> Step:
    return s.StopDhcp(name=name, summary="DHCP: stop dnsmasq", pidfile=pidfile)


def _delete_network(name: str, vms: Mapping[str, VirtualMachine], observed: ObservedState) -> Change:
    record = observed.network_records[name]
    users = sorted(vm.name for vm in vms.values() for nic in vm.spec.networks if nic.network == name)
    if users:
        return Change.planned(resource="Network", name=name, action=Action.NOOP,
                              refusals=[f"its manifest was removed but VMs still use it: {', '.join(users)}"])
    bridge = record.network.spec.bridge
    dhcp = observed.host.dhcp.get(name)
    stop = [_stop_dhcp(name, paths.dhcp_pidfile(observed.state_dir, name))] if dhcp and dhcp.argv else []
    steps = [*stop, s.DeleteBridge(name=name, summary=f"delete bridge {bridge}", bridge=bridge),
             s.ForgetNetwork(name=name, summary="forget the network")]
    return Change.planned(resource="Network", name=name, action=Action.DELETE, reasons=["its manifest was removed"],
                          steps=steps)


def firewall_nics(vms: Mapping[str, VirtualMachine]) -> list[NicFirewall]:
    nics = []
    for vm in vms.values():
        for nic in vm.spec.networks:
            if nic.type == "bridge":
                nics.append(NicFirewall(vm=vm.name, nic=nic.name, tap=tap_name(vm.name, nic.name),
                                        mac=nic_mac(vm.name, nic), ips=tuple(nic.ips), ipv6=nic.ipv6,
                                        firewall=nic.firewall or FirewallSpec()))
    return nics


def _firewall(networks: Mapping[str, Network], vms: Mapping[str, VirtualMachine], observed: ObservedState,
              result: NetworkPlan) -> Change | None:
    caps = observed.host.capabilities
    routed = [RoutedNetwork(name=n.name, bridge=n.spec.bridge, subnet=_subnet(n.spec.address), nat=n.spec.nat,
                            isolated=n.spec.isolated) for n in networks.values() if n.spec.address]
    user_nics = any(nic.type == "user" for vm in vms.values() for nic in vm.spec.networks)
    try:
        ruleset = build_ruleset(firewall_nics(vms), routed, caps, table=firewall_table_of(observed),
                                loopback_uid=observed.host.qemu_uid if user_nics else None,
                                legacy=observed.host.legacy_table)
    except UnsupportedRule as exc:
        for vm in vms.values():
            if any(nic.type == "bridge" for nic in vm.spec.networks):
                result.blocked[vm.name] = f"its firewall cannot be applied: {exc}"
        return Change.planned(resource="Firewall", name=FIREWALL, action=Action.NOOP, refusals=[str(exc)])
    return _firewall_change(ruleset, observed.host.firewall)


def _firewall_change(ruleset: Ruleset, found: Mapping[str, str]) -> Change | None:
    """The rules to add and remove (a set difference on the rules' comments), as one atomic replacement."""
    wanted = ruleset.by_key()
    added = [key for key in wanted if key not in found]  # in ruleset order
    removed = sorted(set(found) - set(wanted))
    if not added and not removed and not ruleset.legacy:
        return None
    fields = [FieldChange(path="rule", before=None, after=wanted[key].comment.split(" ", 1)[1], mode=Mode.LIVE,
                          how="nftables") for key in added]
    fields += [FieldChange(path="rule", before=found[key].split(" ", 1)[-1], after=None, mode=Mode.LIVE,
                           how="nftables") for key in removed]
    reasons = []
    if added:
        reasons.append(f"{len(added)} rule(s) to install" if not found else
                       f"{len(added)} rule(s) missing or changed (drift or new rules)")
    if removed:
        reasons.append(f"{len(removed)} rule(s) no longer wanted")
    if ruleset.legacy:
        reasons.append("the table 'infinization' shared by older versions is deleted")
    step = s.ApplyFirewall(name=FIREWALL, summary=f"replace the nftables tables {ruleset.table} atomically (one "
                           "transaction)", script=ruleset.script())
    return Change.planned(resource="Firewall", name=FIREWALL, action=Action.UPDATE if found else Action.CREATE,
                          reasons=reasons, fields=fields, steps=[step])


def firewall_table_of(observed: ObservedState) -> str:
    """This state directory's table name, as the observer found it (from the resolved path)."""
    return observed.host.table or firewall_table(observed.state_dir)


def _subnet(address: str | None) -> str:
    return str(ipaddress.ip_interface(address).network) if address else ""


def tap_repairs(
    vm: VirtualMachine, networks: Mapping[str, Network], observed: ObservedState, plugged: set[str]
) -> tuple[list[Step], list[FieldChange], list[str]]:
    """For a running VM: TAPs detached from their bridge or down are re-attached live; the TAP of a
    plugged NIC (``plugged``) that is gone needs a restart (its file descriptor belonged to QEMU)."""
    steps: list[Step] = []
    fields: list[FieldChange] = []
    causes: list[str] = []
    for nic in vm.spec.networks:
        if nic.type != "bridge":
            continue
        tap = tap_name(vm.name, nic.name)
        link = observed.host.links.get(tap)
        bridge = nic_bridge(nic, networks)
        if link is None:
            if nic.name in plugged:
                causes.append(f"networks[{nic.name}]: TAP {tap} is gone (deleted by hand?); only a new QEMU "
                              "can get a new one")
            continue  # not plugged yet: the NIC's hot-plug creates it
        if link.master != bridge or not link.up:
            what = f"on {link.master or 'no bridge'}" if link.master != bridge else "down"
            steps.append(s.RepairTap(name=vm.name, target=nic.name, tap=tap, bridge=bridge,
                                     summary=f"NIC {nic.name}: TAP {tap} is {what}: attach to {bridge} and set up"))
            fields.append(FieldChange(path=f"networks[{nic.name}].tap", before=link.master, after=bridge,
                                      mode=Mode.LIVE, how="netlink: set master, up"))
    return steps, fields, causes
