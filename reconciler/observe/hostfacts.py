"""Where an observation takes its host-wide facts from: host networking, CPUs and hugepages, listening ports.

``observe.snapshot.observe`` asks a ``HostFacts`` for them. This one reads everything afresh on every call
(the CLI: one command, one look). The sync daemon passes ``runtime.hostfacts.CachedHostFacts`` instead,
which keeps what only netlink and nftables change between their events, so a reconcile of one VM does not
re-read the whole host. Read-only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from reconciler.adapters import cgroups
from reconciler.observe import display
from reconciler.observe.hostnet import observe_host_network
from reconciler.plan.hostfacts import ObservedCpuHost
from reconciler.plan.observed import ObservedHostNetwork
from reconciler.spec.host import HostConfig
from reconciler.spec.models import VirtualMachine


class HostFacts:
    """Host-wide facts, read now."""

    async def network(self, links: set[str], dhcp: dict[str, tuple[Path, Path]], state_dir: Path,
                      qemu_user: str | None) -> ObservedHostNetwork:
        """The links in ``links``, our firewall rules, the kernel's features, the QEMU user's uid and the
        DHCP servers in ``dhcp`` (``observe.hostnet.observe_host_network``)."""
        return await observe_host_network(links, dhcp, state_dir, qemu_user)

    def cpu_host(self) -> ObservedCpuHost:
        return cgroups.read_cpu_host()

    def listening(self, desired: Mapping[str, VirtualMachine], host: HostConfig) -> list[int]:
        """The display ports some socket listens on. Only a VM with a display enabled needs them (the
        planner's port choice), and reading /proc/net/tcp walks the kernel's whole socket hash table."""
        if not any(vm.spec.display.enabled for vm in desired.values()):
            return []
        return display.listening(desired, host)
