"""Build the ``ObservedState`` the planner reads: one pass over the state directory, /proc, QMP and images.

Called by the CLI (plan, apply, status) and, after every step batch, by the executor to confirm.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from reconciler.observe import images, monitor, processes
from reconciler.observe.hostnet import observe_host_network
from reconciler.observe.live import observe_live
from reconciler.observe.records import (
    LiveRecord,
    known_vm_names,
    read_exit,
    read_launch,
    read_live,
    read_network_records,
)
from reconciler.plan.observed import (
    AppliedRecord,
    LiveState,
    ObservedImage,
    ObservedProcess,
    ObservedState,
    ObservedVM,
)
from reconciler.spec.layout import StateLayout
from reconciler.spec.models import Network, VirtualMachine, VirtualMachineSpec, tap_name


async def observe_vm(layout: StateLayout, name: str, disk_names: Iterable[str]) -> ObservedVM:
    paths = layout.vm(name)
    process = processes.find_qemu(paths.pidfile)
    observed_process = None
    if process is not None:
        launch = read_launch(paths.launch)
        launched = launch.vm.spec if launch is not None and tuple(launch.argv) == process.cmdline else None
        status, live = await query_running(paths.qmp, launched, read_live(paths.live, process.pid, process.start_time))
        observed_process = ObservedProcess(pid=process.pid, status=status, launched=launched, live=live)
    disks = {disk: images.inspect_image(paths.disk(disk)) for disk in sorted(set(disk_names))}
    last_exit = read_exit(paths.exit) if observed_process is None else None
    return ObservedVM(name=name, process=observed_process, disks=disks, last_exit=last_exit)


async def query_running(
    socket: Path, launched: VirtualMachineSpec | None, record: LiveRecord
) -> tuple[str, LiveState | None]:
    """The run status and live configuration of a running QEMU, in one monitor session."""
    try:
        async with monitor.session(socket) as qmp:
            status = str((await qmp.execute("query-status")).get("status", "unknown"))
            return status, await observe_live(qmp, launched, record)
    except monitor.MonitorError:
        return "unreachable", None


async def observe(
    layout: StateLayout,
    desired: Mapping[str, VirtualMachine],
    records: Mapping[str, AppliedRecord],
    networks: Mapping[str, Network] | None = None,
    only: set[str] | None = None,
) -> ObservedState:
    """Everything the planner needs about the VMs in ``desired``, in ``records`` or in the state folder
    (restricted to ``only`` when given), and about the host networking they and ``networks`` use."""
    names = sorted(set(desired) | set(records) | set(known_vm_names(layout)))
    if only is not None:  # the sync daemon reconciles one VM at a time
        names = [name for name in names if name in only]
    vms = {}
    backing: dict[str, ObservedImage] = {}
    for name in names:
        disk_names: set[str] = set()
        for vm in (desired.get(name), records[name].vm if name in records else None):
            if vm is not None:
                disk_names |= {disk.name for disk in vm.spec.disks}
                for disk in vm.spec.disks:
                    if disk.image and disk.image not in backing:
                        backing[disk.image] = images.inspect_image(disk.image)
        vms[name] = await observe_vm(layout, name, disk_names)
    network_records = read_network_records(layout)
    interesting = {n.spec.bridge for n in (networks or {}).values()}
    interesting |= {r.network.spec.bridge for r in network_records.values()}
    for vm in [*desired.values(), *(r.vm for r in records.values())]:
        for nic in vm.spec.networks:
            if nic.type == "bridge":
                interesting.add(tap_name(vm.name, nic.name))
                if nic.bridge:
                    interesting.add(nic.bridge)
    dhcp = {name: (layout.dhcp_pidfile(name), layout.dhcp_leases(name))
            for name in set(networks or {}) | set(network_records)}
    host = await observe_host_network(interesting, dhcp)
    return ObservedState(state_dir=str(layout.root), vms=vms, images=backing, host=host,
                         network_records=network_records)
