"""Build the ``ObservedState`` the planner reads: one pass over the state directory, /proc, QMP and images.

Called by the CLI (plan, apply, status) and by the sync daemon before and after each reconcile.
Read-only: nothing here changes the host.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from reconciler.adapters import agent, monitor, procfs, qemu_img
from reconciler.errors import MonitorError
from reconciler.observe.hostnet import observe_host_network
from reconciler.observe.live import observe_live
from reconciler.observe.paths import observe_paths
from reconciler.plan.observed import LiveState, ObservedImage, ObservedProcess, ObservedState, ObservedVM
from reconciler.spec.host import HostConfig
from reconciler.spec.models import Network, VirtualMachine, VirtualMachineSpec, nic_bridge, tap_name
from reconciler.state import files
from reconciler.state.layout import StateLayout, VMPaths
from reconciler.state.models import AppliedRecord, LiveRecord


async def observe_vm(layout: StateLayout, name: str, disk_names: Iterable[str],
                     ask_agent: bool = False) -> ObservedVM:
    paths = layout.vm(name)
    examined = procfs.examine(paths)
    process = examined.process
    observed_process = None
    if process is not None:
        launch = files.read_launch(paths)
        launched = launch.vm.spec if launch is not None and tuple(launch.argv) == process.cmdline else None
        status, live = await query_running(paths, launched, files.read_live(paths, process.pid, process.start_time))
        asked = ask_agent and launched is not None and launched.guestAgent.enabled
        guest = await agent.query(paths.agent_socket) if asked else None
        observed_process = ObservedProcess(pid=process.pid, start_time=process.start_time, status=status,
                                           launched=launched, live=live, agent=guest)
    disks = {disk: qemu_img.inspect_image(paths.disk(disk)) for disk in sorted(set(disk_names))}
    last_exit = None
    if observed_process is None and (ended := files.read_exit(paths)) is not None:
        last_exit = ended.reason
    tpm = procfs.find_swtpm(paths)
    return ObservedVM(name=name, process=observed_process, disks=disks, last_exit=last_exit,
                      unverified=examined.unverified, tpm_pid=tpm.pid if tpm else None,
                      tpm_state=files.tpm_state_exists(paths),
                      efi_vars=str(paths.efi_vars) if files.efi_vars_exists(paths) else None)


async def query_running(
    paths: VMPaths, launched: VirtualMachineSpec | None, record: LiveRecord
) -> tuple[str, LiveState | None]:
    """The run status and live configuration of a running QEMU, in one monitor session."""
    try:
        async with monitor.session(paths.qmp) as qmp:
            status = str((await qmp.execute("query-status")).get("status", "unknown"))
            return status, await observe_live(qmp, launched, record)
    except MonitorError:
        return "unreachable", None


def _vm_names(layout: StateLayout, desired: Mapping[str, VirtualMachine], records: Mapping[str, AppliedRecord],
              only: set[str] | None) -> list[str]:
    names = sorted(set(desired) | set(records) | set(files.known_vm_names(layout)))
    return [name for name in names if only is None or name in only]


def _known_specs(name: str, desired: Mapping[str, VirtualMachine],
                 records: Mapping[str, AppliedRecord]) -> list[VirtualMachine]:
    """The VM as desired and as last applied: both name disks and NICs worth looking at."""
    return [vm for vm in (desired.get(name), records[name].vm if name in records else None) if vm is not None]


def _interesting_links(vms: Iterable[VirtualMachine], networks: Mapping[str, Network],
                       recorded: Mapping[str, Network]) -> set[str]:
    """Bridges and TAPs the plan depends on (others coming and going must not make a plan stale)."""
    names = {n.spec.bridge for n in networks.values()} | {n.spec.bridge for n in recorded.values()}
    for vm in vms:
        for nic in vm.spec.networks:
            if nic.type == "bridge":
                names.add(tap_name(vm.name, nic.name))
                if bridge := nic_bridge(nic, networks):
                    names.add(bridge)
    return names


async def observe(
    layout: StateLayout,
    desired: Mapping[str, VirtualMachine],
    records: Mapping[str, AppliedRecord],
    networks: Mapping[str, Network] | None = None,
    only: set[str] | None = None,
    host: HostConfig | None = None,
    ask_agent: bool = False,
) -> ObservedState:
    """Everything the planner needs about the VMs in ``desired``, in ``records`` or in the state folder
    (restricted to ``only`` when given), about the host paths they name (judged by ``host``'s policy)
    and about the host networking they and ``networks`` use. ``ask_agent`` (status): also ask each running
    VM's guest agent, within ``agent.DEADLINE`` each."""
    networks = networks or {}
    vms = {}
    backing: dict[str, ObservedImage] = {}
    seen: list[VirtualMachine] = []
    for name in _vm_names(layout, desired, records, only):
        specs = _known_specs(name, desired, records)
        seen += specs
        for disk in (disk for vm in specs for disk in vm.spec.disks):
            if disk.image and disk.image not in backing:
                backing[disk.image] = qemu_img.inspect_image(disk.image)
        vms[name] = await observe_vm(layout, name, {disk.name for vm in specs for disk in vm.spec.disks}, ask_agent)
    network_records = files.read_network_records(layout)
    recorded = {name: record.network for name, record in network_records.items()}
    links = _interesting_links([*desired.values(), *(r.vm for r in records.values())], networks, recorded)
    dhcp = {name: (layout.dhcp_pidfile(name), layout.dhcp_leases(name)) for name in set(networks) | set(recorded)}
    config = host or HostConfig()
    host_network = await observe_host_network(links, dhcp, layout.root, config.qemuUser)
    paths = observe_paths(seen, config, str(layout.root))
    return ObservedState(state_dir=str(layout.root), vms=vms, images=backing, host=host_network,
                         network_records=network_records, paths=paths, host_memory=host_memory())


def host_memory() -> int | None:
    """The host's RAM in bytes (a guest's memory beyond it cannot be allocated), None if unknown."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
