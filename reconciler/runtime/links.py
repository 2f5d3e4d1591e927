"""Which host network interfaces the sync daemon cares about: pure, called by ``runtime.daemon`` for each
batch of netlink link events (``runtime.listeners.watch_netlink``).

A link event wakes a full reconcile of every VM, so it must be one of ours: a bridge a desired or created
Network or a bridged NIC names, or one of our TAPs (``inz`` + hash, ``spec.models.tap_name``). Every other
interface on the host (another tool's veth, a container's bridge, another installation's churn) is ignored:
on a busy host those events would otherwise keep an idle daemon re-observing all its VMs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from reconciler.spec.models import Network, VirtualMachine, nic_bridge

TAP_PREFIX = "inz"


def our_links(vms: Iterable[VirtualMachine], networks: Mapping[str, Network],
              recorded: Mapping[str, Network]) -> frozenset[str]:
    """The bridges of the desired and the created (recorded) Networks, and of every bridged NIC."""
    names = {net.spec.bridge for net in (*networks.values(), *recorded.values())}
    for vm in vms:
        for nic in vm.spec.networks:
            if nic.type == "bridge" and (bridge := nic_bridge(nic, {**recorded, **networks})):
                names.add(bridge)
    return frozenset(names)


def matters(changed: Iterable[str | None], ours: frozenset[str]) -> bool:
    """Whether a batch of changed links (None: a link whose name the event did not carry) concerns us."""
    return any(name is None or name in ours or name.startswith(TAP_PREFIX) for name in changed)
