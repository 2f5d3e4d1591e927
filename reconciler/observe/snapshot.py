"""Build the ``ObservedState`` the planner reads: one pass over the state directory, /proc, QMP and images.

VMs are observed side by side (``OBSERVE_JOBS`` at once), so a no-op plan with 25 running VMs costs about
what it costs with one; a running VM's disks are read from its QEMU (``observe.images``); host-wide facts
(netlink, nftables) are read once per snapshot, not per VM.

Called by the CLI (plan, apply, status) and by the sync daemon before and after each reconcile.
Read-only: nothing here changes the host.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from reconciler.adapters import agent, cgroups, procfs, qmpquery
from reconciler.errors import MonitorError
from reconciler.observe import display, images
from reconciler.observe.hostdev import observe_host_devices
from reconciler.observe.hostfacts import HostFacts
from reconciler.observe.live import parse_live, query_live
from reconciler.observe.paths import observe_paths
from reconciler.observe.placement import observe_placement
from reconciler.plan.hostfacts import CpusetHierarchy
from reconciler.plan.observed import LiveState, ObservedProcess, ObservedState, ObservedVM
from reconciler.spec.host import HostConfig
from reconciler.spec.models import Network, VirtualMachine, VirtualMachineSpec, nic_bridge, tap_name
from reconciler.state import files
from reconciler.state.layout import StateLayout, VMPaths
from reconciler.state.models import AppliedRecord, ExitRecord, LiveRecord

OBSERVE_JOBS = 32  # VMs observed at once: each holds a monitor connection and maybe a qemu-img process


async def observe_vm(layout: StateLayout, name: str, disk_names: Iterable[str],
                     ask_agent: bool = False, cpuset: CpusetHierarchy | None = None) -> ObservedVM:
    paths = layout.vm(name)
    examined = procfs.examine(paths)
    process = examined.process
    observed_process = None
    nodes = None
    if process is not None:
        launch = examined.launch
        launched = launch.vm.spec if launch is not None and tuple(launch.argv) == process.cmdline else None
        status, live, nodes = await query_running(paths, launched,
                                                  files.read_live(paths, process.pid, process.start_time),
                                                  process.cmdline)
        asked = ask_agent and launched is not None and launched.guestAgent.enabled
        guest = await agent.query(paths.agent_socket) if asked else None
        placement = observe_placement(process.pid, live.vcpu_threads if live else {}, paths.dir,
                                      cpuset or cgroups.cpuset_hierarchy())
        observed_process = ObservedProcess(pid=process.pid, start_time=process.start_time, status=status,
                                           launched=launched, live=live, agent=guest, placement=placement,
                                           recorded=examined.recorded)
    disks = await images.observe_disks({disk: paths.disk(disk) for disk in sorted(set(disk_names))}, nodes)
    last_exit = None
    if observed_process is None and (ended := files.read_exit(paths) or _exit_from_log(paths)) is not None:
        last_exit = ended.reason
    tpm = procfs.find_swtpm(paths)
    return ObservedVM(name=name, process=observed_process, disks=disks, last_exit=last_exit,
                      unverified=examined.unverified, tpm_pid=tpm.pid if tpm else None,
                      tpm_state=files.tpm_state_exists(paths),
                      efi_vars=str(paths.efi_vars) if files.efi_vars_exists(paths) else None,
                      efi_vars_secure_boot=files.efi_vars_origin(paths))


def _exit_from_log(paths: VMPaths) -> ExitRecord | None:
    """No daemon recorded how the last QEMU ended: its own log says, once the QEMU launch.json names is gone."""
    launch = files.read_launch(paths)
    if launch is None or launch.pid is None:
        return None
    if procfs.is_alive(launch.pid) and procfs.start_time(launch.pid) == launch.start_time:
        return None  # still running (not verified, or starting): it has not ended
    return files.exit_from_log(paths)


async def query_running(
    paths: VMPaths, launched: VirtualMachineSpec | None, record: LiveRecord, cmdline: Sequence[str] | None = None
) -> tuple[str, LiveState | None, list[dict[str, Any]] | None]:
    """The run status, live configuration and block nodes (its disks' images) of a running QEMU, in one
    monitor session, every query pipelined (``observe.live.query_live``; ``cmdline``: the QEMU's, from
    /proc)."""
    try:
        async with qmpquery.session(paths.qmp) as qmp:
            answers = await query_live(qmp, cmdline)
    except MonitorError:
        return "unreachable", None, None
    return answers.status, parse_live(answers, launched, record), answers.named_nodes


def _vm_names(layout: StateLayout, desired: Mapping[str, VirtualMachine], records: Mapping[str, AppliedRecord],
              only: set[str] | None) -> list[str]:
    names = sorted(set(desired) | set(records) | set(files.known_vm_names(layout)))
    return [name for name in names if only is None or name in only]


def disk_names(vms: Iterable[VirtualMachine]) -> set[str]:
    """The disks a VM's observation looks at: those its specs name (as desired and as last applied)."""
    return {disk.name for vm in vms for disk in vm.spec.disks}


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
    facts: HostFacts | None = None,
    known: Mapping[str, ObservedVM] | None = None,
) -> ObservedState:
    """Everything the planner needs about the VMs in ``desired``, in ``records`` or in the state folder
    (restricted to ``only`` when given), about the host paths they name (judged by ``host``'s policy)
    and about the host networking they and ``networks`` use. ``ask_agent`` (status): also ask each running
    VM's guest agent, within ``agent.DEADLINE`` each. ``facts``: where host-wide facts come from (default:
    read now; the sync daemon keeps them between events). ``known``: VMs already observed by the caller
    with ``observe_vm`` over ``disk_names`` of their specs (apply observes each VM as soon as its change
    has ended, while the others' go on), taken as they are."""
    networks = networks or {}
    names = _vm_names(layout, desired, records, only)
    specs = {name: _known_specs(name, desired, records) for name in names}
    seen = [vm for name in names for vm in specs[name]]
    gate = asyncio.Semaphore(OBSERVE_JOBS)
    facts = facts or HostFacts()
    cpu_host = facts.cpu_host()
    config = host or HostConfig()

    async def one(name: str) -> ObservedVM:
        if known is not None and name in known:
            return display.with_display(layout, known[name], desired.get(name), config)
        async with gate:
            found = await observe_vm(layout, name, disk_names(specs[name]), ask_agent, cpu_host.cpuset)
            return display.with_display(layout, found, desired.get(name), config)

    network_records = files.read_network_records(layout)
    recorded = {name: record.network for name, record in network_records.items()}
    links = _interesting_links([*desired.values(), *(r.vm for r in records.values())], networks, recorded)
    dhcp = {name: (layout.dhcp_pidfile(name), layout.dhcp_leases(name)) for name in set(networks) | set(recorded)}
    # Every VM at once (bounded), beside the host-wide facts (read once, in a worker thread) and the
    # backing images: each mostly waits on a QEMU's monitor, on netlink or nft, or on a qemu-img process.
    host_task = asyncio.ensure_future(facts.network(links, dhcp, layout.root, config.qemuUser))
    backing_task = asyncio.ensure_future(
        images.inspect_all(disk.image for vm in seen for disk in vm.spec.disks if disk.image))
    observed = await asyncio.gather(*(one(name) for name in names))
    vms = dict(zip(names, observed, strict=True))
    host_network, backing = await host_task, await backing_task
    paths = observe_paths(seen, config, str(layout.root))
    return ObservedState(state_dir=str(layout.root), vms=vms, images=backing, host=host_network,
                         network_records=network_records, paths=paths, cpu_host=cpu_host,
                         listening=facts.listening(desired, config), display_ports=files.read_display_ports(layout),
                         devices=observe_host_devices(layout, seen, config), host_memory=host_memory())


def host_memory() -> int | None:
    """The host's RAM in bytes (a guest's memory beyond it cannot be allocated), None if unknown."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
