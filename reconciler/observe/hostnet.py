"""Observe host networking: links over netlink (pyroute2), our nftables rules, ip_forward, kernel features.

Read-only. Called by the snapshot builder. The sync pyroute2 ``IPRoute`` is used in a worker thread
(it refuses to run inside an event loop's thread).
"""

from __future__ import annotations

import asyncio
import functools
import json
import pwd
import subprocess
from pathlib import Path
from typing import Any

from reconciler.adapters import procfs, rtnl, threads
from reconciler.hostnet.nftables import FAMILIES, LEGACY_TABLE, HostCapabilities, firewall_table
from reconciler.plan.observed import ObservedDhcp, ObservedHostNetwork, ObservedLink
from reconciler.state import files

NFT = "nft"
VHOST_NET = Path("/dev/vhost-net")
_PROBES = {
    "bridge_conntrack": "ct state established accept",
    "bridge_reject": "reject",
}


def _ipv6_slaac(name: str) -> bool | None:
    """Whether a bridge would take a router advertisement's route or address (None: no IPv6 here)."""
    conf = Path("/proc/sys/net/ipv6/conf") / name
    try:
        return any((conf / key).read_text().strip() != "0" for key in ("accept_ra", "autoconf"))
    except OSError:
        return None


def _links() -> dict[str, ObservedLink]:
    with rtnl.iproute()() as ipr:  # pyroute2 (0.3-0.6 s to import): only when links are read
        raw = ipr.get_links()
        names = {link["index"]: link.get("IFLA_IFNAME") for link in raw}
        addresses: dict[int, list[str]] = {}
        for addr in ipr.get_addr():
            addresses.setdefault(addr["index"], []).append(f"{addr.get('IFA_ADDRESS')}/{addr['prefixlen']}")
    links = {}
    for link in raw:
        info = link.get("IFLA_LINKINFO")
        kind = info.get("IFLA_INFO_KIND") if info else None
        name = link.get("IFLA_IFNAME")
        master = link.get("IFLA_MASTER")
        links[name] = ObservedLink(
            name=name, kind="tap" if kind == "tun" else kind, up=bool(link["flags"] & 1),
            master=names.get(master) if master else None, addresses=sorted(addresses.get(link["index"], [])),
            ipv6_slaac=_ipv6_slaac(name) if kind == "bridge" else None,
        )
    return links


def _nft_json(*what: str) -> list[dict[str, Any]]:
    done = subprocess.run([NFT, "-j", "list", *what], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return []  # the table does not exist (yet, or any more)
    return list(json.loads(done.stdout).get("nftables", []))


def _tables() -> set[tuple[str, str]]:
    """(family, name) of every table in this network namespace (names only: nothing of theirs is read)."""
    return {(item["table"]["family"], item["table"]["name"]) for item in _nft_json("tables") if "table" in item}


async def _firewall(table: str, tables: set[tuple[str, str]]) -> dict[str, str]:
    """Our rules, from our own tables only (another state directory's tables are not ours to read); each
    family's table listed by its own ``nft`` at the same time."""
    families = [family for family in FAMILIES if (family, table) in tables]
    listed = await asyncio.gather(*(threads.run(_nft_json, "table", family, table) for family in families))
    found = {}
    for family, items in zip(families, listed, strict=True):
        for item in items:
            rule = item.get("rule")
            comment = rule.get("comment", "") if rule else ""
            if rule and comment.startswith("infz:"):
                found[f"{family}/{rule['chain']}/{comment.split(' ', 1)[0]}"] = comment
    return found


@functools.cache
def _capabilities() -> HostCapabilities:
    """Probe the kernel once per process with ``nft --check`` (nothing is changed)."""
    results = {}
    for name, rule in _PROBES.items():
        script = (f"table bridge infzprobe {{\n chain c {{\n  type filter hook forward priority 0; policy accept;\n"
                  f"  {rule}\n }}\n}}\n")
        done = subprocess.run([NFT, "-c", "-f", "-"], input=script, capture_output=True, text=True, check=False)
        results[name] = done.returncode == 0
    return HostCapabilities(**results, vhost_net=VHOST_NET.exists())


def _ip_forward() -> bool:
    try:
        return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    except OSError:
        return False


def _uid(user: str | None) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid if user else None
    except KeyError:
        return None


async def observe_links_and_firewall(names: set[str], state_dir: Path) -> ObservedHostNetwork:
    """The part of ``observe_host_network`` that only netlink and nftables change (links, our rules, the
    legacy table, the kernel's features; only the links in ``names``: unrelated interfaces coming and going
    must not make plans stale): what the sync daemon keeps between events (``runtime.hostfacts``). The rest
    (DHCP servers, ip_forward, the QEMU user's uid) is left at its defaults: ``with_fresh_parts`` adds it.

    Each fact that needs a process or a netlink socket is read in its own worker thread, all at once: the
    ``nft`` runs were one after another (five processes, the kernel probes included, on every plan). The
    probes only matter to bridge-family rules, so without any bridge or TAP (``names`` empty) they are not
    run and the defaults stand (no bridge rule is rendered then)."""
    links = asyncio.ensure_future(threads.run(_links)) if names else None
    probed = asyncio.ensure_future(threads.run(_capabilities)) if names else None
    table, tables = firewall_table(str(state_dir.resolve())), await threads.run(_tables)
    firewall = await _firewall(table, tables)
    legacy = bool({("bridge", LEGACY_TABLE), ("ip", LEGACY_TABLE)} & tables)
    capabilities = await probed if probed else HostCapabilities(vhost_net=VHOST_NET.exists())
    found = {name: link for name, link in (await links).items() if name in names} if links else {}
    return ObservedHostNetwork(links=found, table=table, firewall=firewall, legacy_table=legacy,
                               capabilities=capabilities)


def with_fresh_parts(kept: ObservedHostNetwork, dhcp: dict[str, tuple[Path, Path]],
                     qemu_user: str | None) -> ObservedHostNetwork:
    """``kept`` (from ``observe_links_and_firewall``) with the facts no event announces read now: the DHCP
    servers and their leases, ip_forward and the uid of ``qemu_user`` (a few small file reads)."""
    return kept.model_copy(update={"qemu_uid": _uid(qemu_user), "ip_forward": _ip_forward(),
                                   "dhcp": {net: observe_dhcp(*files) for net, files in sorted(dhcp.items())}})


async def observe_host_network(names: set[str], dhcp: dict[str, tuple[Path, Path]], state_dir: Path,
                               qemu_user: str | None = None) -> ObservedHostNetwork:
    """The links named in ``names`` (bridges, TAPs), our firewall rules (in the tables of ``state_dir``),
    the kernel's features, the uid of ``qemu_user`` and the DHCP servers of the Networks in ``dhcp``
    (name -> pidfile, leases file): everything read now (the CLI; the daemon keeps the first part between
    events: ``runtime.hostfacts``)."""
    return with_fresh_parts(await observe_links_and_firewall(names, state_dir), dhcp, qemu_user)


def observe_dhcp(pidfile: Path, leases: Path) -> ObservedDhcp:
    """The dnsmasq that owns ``pidfile`` (proven by its /proc cmdline naming it) and its leases."""
    found = files.read_dhcp_leases(leases)
    pid = procfs.find_dnsmasq(pidfile)
    argv = list(procfs.read_cmdline(pid) or ()) if pid is not None else None
    return ObservedDhcp(argv=argv or None,
                        pid=pid if argv else None, leases=found)
