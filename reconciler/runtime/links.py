"""Which host network interfaces the sync daemon cares about, and which of its keys each one concerns:
pure, called by ``runtime.daemon`` for each batch of netlink events (``runtime.listeners.watch_netlink``).

A link event wakes only the keys of our own interfaces: a VM's TAP (by its exact name, ``tap_name``: another
installation's TAPs share the prefix) wakes that VM, a bridge of a desired or created Network, or one a
bridged NIC names, wakes the host key. Every other interface on the host (another tool's veth, a
container's bridge) wakes nothing: on a busy host those events would otherwise keep an idle daemon
re-observing all its VMs. The periodic resync still sees anything an event missed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from reconciler.spec.models import Network, VirtualMachine, nic_bridge, tap_name


def link_keys(vms: Iterable[VirtualMachine], networks: Mapping[str, Network], recorded: Mapping[str, Network],
              host_key: str) -> dict[str, set[str]]:
    """Interface name -> the keys it concerns: each VM's TAPs -> the VM; the bridges of the desired and the
    created (``recorded``) Networks and of every bridged NIC -> ``host_key``."""
    keys: dict[str, set[str]] = {net.spec.bridge: {host_key} for net in (*networks.values(), *recorded.values())}
    known = {**recorded, **networks}
    for vm in vms:
        for nic in vm.spec.networks:
            if nic.type == "bridge":
                keys.setdefault(tap_name(vm.name, nic.name), set()).add(vm.name)
                if bridge := nic_bridge(nic, known):
                    keys.setdefault(bridge, set()).add(host_key)
    return keys


def woken(names: Iterable[str], keys: Mapping[str, set[str]]) -> list[str]:
    """The keys a batch of changed interfaces wakes, sorted (none for interfaces that are not ours)."""
    return sorted({key for name in names for key in keys.get(name, ())})
