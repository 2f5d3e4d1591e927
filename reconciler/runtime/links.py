"""Which host network interfaces the sync daemon cares about: pure, called by ``runtime.daemon`` for each
batch of netlink link events (``runtime.listeners.watch_netlink``).

A link event wakes a full reconcile of every VM, so it must be one of ours: a bridge a desired or created
Network or a bridged NIC names, or the TAP of one of our VMs' bridged NICs (``spec.models.tap_name``, by its
exact name: another installation on the same host names its TAPs the same way). Every other interface on
the host (another tool's veth, a container's bridge, another installation's churn) is ignored: on a busy
host those events would otherwise keep an idle daemon re-observing all its VMs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from reconciler.spec.models import Network, VirtualMachine, nic_bridge, tap_name


def our_links(vms: Iterable[VirtualMachine], networks: Mapping[str, Network],
              recorded: Mapping[str, Network]) -> frozenset[str]:
    """The bridges of the desired and the created (recorded) Networks, and every bridged NIC's bridge and TAP."""
    names = {net.spec.bridge for net in (*networks.values(), *recorded.values())}
    for vm in vms:
        for nic in vm.spec.networks:
            if nic.type != "bridge":
                continue
            names.add(tap_name(vm.name, nic.name))
            if bridge := nic_bridge(nic, {**recorded, **networks}):
                names.add(bridge)
    return frozenset(names)


def matters(changed: Iterable[str | None], ours: frozenset[str]) -> bool:
    """Whether a batch of changed links (None: a link whose name the event did not carry) concerns us."""
    return any(name is None or name in ours for name in changed)
