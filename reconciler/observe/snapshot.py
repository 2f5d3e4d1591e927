"""Build the ``ObservedState`` the planner reads: one pass over the state directory, /proc, QMP and images.

Called by the CLI (plan, apply, status) and, after every step batch, by the executor to confirm.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from reconciler.observe import images, monitor, processes
from reconciler.observe.records import known_vm_names, read_launch
from reconciler.plan.observed import AppliedRecord, ObservedImage, ObservedProcess, ObservedState, ObservedVM
from reconciler.spec.layout import StateLayout
from reconciler.spec.models import VirtualMachine


async def observe_vm(layout: StateLayout, name: str, disk_names: Iterable[str]) -> ObservedVM:
    paths = layout.vm(name)
    process = processes.find_qemu(paths.pidfile)
    observed_process = None
    if process is not None:
        launch = read_launch(paths.launch)
        launched = launch.vm.spec if launch is not None and tuple(launch.argv) == process.cmdline else None
        observed_process = ObservedProcess(pid=process.pid, status=await query_status(paths.qmp),
                                           launched=launched)
    disks = {disk: images.inspect_image(paths.disk(disk)) for disk in sorted(set(disk_names))}
    return ObservedVM(name=name, process=observed_process, disks=disks)


async def query_status(socket: Path) -> str:
    try:
        async with monitor.session(socket) as qmp:
            reply = await qmp.execute("query-status")
    except monitor.MonitorError:
        return "unreachable"
    return str(reply.get("status", "unknown"))


async def observe(
    layout: StateLayout,
    desired: Mapping[str, VirtualMachine],
    records: Mapping[str, AppliedRecord],
) -> ObservedState:
    """Everything the planner needs about the VMs in ``desired``, in ``records`` or in the state folder."""
    names = sorted(set(desired) | set(records) | set(known_vm_names(layout)))
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
    return ObservedState(state_dir=str(layout.root), vms=vms, images=backing)
