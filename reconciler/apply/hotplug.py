"""Change a running VM over QMP: hot-plug and unplug disks, NICs and CD-ROM drives, change media, links,
I/O limits, vCPUs, memory and the balloon.

Called by the executor, one step at a time, each within one monitor session. Every function looks at
the VM first and does only what is missing (so a re-run after a crash finishes the job), and confirms
the result before it returns. An unplug waits for ``DEVICE_DELETED`` under a deadline; a guest that does
not release the device leaves the unplug pending (recorded in live.json, retried by the next reconcile),
and the backend is only deleted once the device is gone.

QEMU runs as an unprivileged user that cannot open our files by path: a disk, its backing image and a
CD-ROM medium are opened here and handed over the monitor socket (SCM_RIGHTS + ``add-fd``), and the
block node names ``/dev/fdset/N``; a TAP likewise (``getfd``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
from typing import Any

from reconciler.adapters import procfs, threads
from reconciler.adapters.monitor import Monitor, block_nodes, free_spare_ports, peripheral_ids
from reconciler.apply import disks, hostnet
from reconciler.errors import MonitorError, StepFailed
from reconciler.qemu.argv import (
    backing_blockdevs,
    cdrom_blockdev,
    disk_device_args,
    disk_file_blockdev,
    disk_format_blockdev,
    fdset_path,
    host_forwards,
    hugepage_backend,
    nic_device_args,
)
from reconciler.spec.models import NetworkInterfaceSpec, VirtualMachine, nic_mac, tap_name
from reconciler.spec.naming import (
    SCSI_CONTROLLER,
    backing_file_node,
    backing_node,
    cdrom_device,
    disk_file_node,
    disk_node,
    nic_device,
    nic_netdev,
)
from reconciler.state import files
from reconciler.state.layout import VMPaths
from reconciler.state.models import LiveRecord

UNPLUG_TIMEOUT = 5.0
DEVICE_TIMEOUT = 30.0


async def _free_bus(qmp: Monitor, vm: VirtualMachine) -> str | None:
    """A spare root port on q35 (None on pc, where devices go straight onto pci.0)."""
    if vm.spec.machine.type != "q35":
        return None
    free = free_spare_ports(await qmp.execute("query-pci"))
    if not free:
        raise StepFailed("no free hot-plug slot left (spec.hotplugSlots); a restart adds the device instead")
    return free[0]


async def _confirm_present(qmp: Monitor, device: str) -> None:
    if device not in await peripheral_ids(qmp):
        raise StepFailed(f"device_add of {device} returned, but the device is not there")


async def _add_fd(qmp: Monitor, fd: int, opaque: str) -> str:
    """Hand ``fd`` to QEMU in a new fd set named ``opaque`` (the path it was opened from, which the observer
    reads back); ours is closed either way. Returns the path QEMU opens it by."""
    try:
        qmp.client.send_fd_scm(fd)
        answer = await qmp.execute("add-fd", {"opaque": opaque})
    finally:
        os.close(fd)
    return fdset_path(int(answer["fdset-id"]))


def _qemu_owner(paths: VMPaths) -> tuple[int, int]:
    """The uid and gid the running QEMU was launched as (launch.json)."""
    launch = files.read_launch(paths)
    if launch is None or launch.uid is None:
        raise StepFailed("no launch record says which user the running QEMU is: restart the VM")
    try:
        return launch.uid, pwd.getpwuid(launch.uid).pw_gid
    except KeyError:
        raise StepFailed(f"QEMU's user (uid {launch.uid}) no longer exists: run scripts/setup.sh") from None


async def _add_disk_nodes(qmp: Monitor, paths: VMPaths, vm: VirtualMachine, disk: str) -> None:
    nodes = await block_nodes(qmp)
    spec = next(d for d in vm.spec.disks if d.name == disk)
    backing = None
    if spec.image:
        backing = backing_node(disk)
        if backing not in nodes:
            filename = await _add_fd(qmp, disks.open_read_only(spec.image), spec.image)
            for node in backing_blockdevs(disk, filename, spec.imageFormat):
                await qmp.execute("blockdev-add", node)
    if disk_file_node(disk) not in nodes:
        path = paths.disk(disk)
        filename = await _add_fd(qmp, disks.open_for_qemu(path, *_qemu_owner(paths), spec.readOnly), str(path))
        await qmp.execute("blockdev-add", disk_file_blockdev(disk, filename, spec))
    if disk_node(disk) not in nodes:
        await qmp.execute("blockdev-add", disk_format_blockdev(disk, backing, spec))


async def hotplug_disk(qmp: Monitor, paths: VMPaths, vm: VirtualMachine, disk: str, iops: int, bps: int) -> str:
    device = disk_node(disk)
    if device in await peripheral_ids(qmp):
        return "already plugged"
    spec = next(d for d in vm.spec.disks if d.name == disk)
    if spec.bus == "sata":
        raise StepFailed("q35's AHCI cannot hot-plug a disk (bus sata): a restart adds it instead")
    await _add_disk_nodes(qmp, paths, vm, disk)
    bus = await _free_bus(qmp, vm) if spec.bus == "virtio" else None  # scsi: on the virtio-scsi controller
    await qmp.execute("device_add", disk_device_args(disk, bus, spec), timeout=DEVICE_TIMEOUT)
    await _confirm_present(qmp, device)
    if iops or bps:
        await set_io_limits(qmp, disk, iops, bps)
    return f"plugged on {bus or (SCSI_CONTROLLER if spec.bus == 'scsi' else 'pci.0')}"


async def set_io_limits(qmp: Monitor, disk: str, iops: int, bps: int) -> str:
    # With -blockdev the device's BlockBackend is reached through its QOM path, not its id; a virtio-blk
    # device's through its virtio-backend child (scsi-hd and ide-hd hold it themselves).
    device = f"/machine/peripheral/{disk_node(disk)}"
    if (await peripheral_ids(qmp)).get(disk_node(disk), "virtio-blk-pci").startswith("virtio-"):
        device += "/virtio-backend"
    await qmp.execute("block_set_io_throttle", {
        "id": device,
        "iops": iops, "iops_rd": 0, "iops_wr": 0, "bps": bps, "bps_rd": 0, "bps_wr": 0,
    })
    return f"iops={iops} bps={bps}"


async def _unplug(qmp: Monitor, paths: VMPaths, device: str) -> bool:
    """device_del and wait for DEVICE_DELETED; False (and recorded as pending) if the guest keeps it."""
    if device not in await peripheral_ids(qmp):
        return True
    # Register before device_del so the event cannot be missed. virtio devices send DEVICE_DELETED twice;
    # the first one is for their virtio-backend child and has no 'device' field.
    with qmp.client.listener(("DEVICE_DELETED",)) as listener:
        with contextlib.suppress(MonitorError):  # repeating device_del while pending may error: harmless
            await qmp.execute("device_del", {"id": device})

        async def deleted() -> None:
            async for event in listener:
                data: dict[str, Any] = event.get("data", {})  # type: ignore[assignment]
                if data.get("device") == device:
                    return

        try:
            await asyncio.wait_for(deleted(), UNPLUG_TIMEOUT)
        except TimeoutError:
            if device in await peripheral_ids(qmp):
                record = _live_record(paths)
                if record is not None and device not in record.unplugs:
                    update_live(paths, unplugs=[*record.unplugs, device])
                return False
    record = _live_record(paths)
    if record is not None and device in record.unplugs:
        update_live(paths, unplugs=[d for d in record.unplugs if d != device])
    return True


def _live_record(paths: VMPaths) -> LiveRecord | None:
    """live.json of the QEMU that runs now (None: no QEMU of this VM runs)."""
    process = procfs.find_qemu(paths)
    return files.read_live(paths, process.pid, process.start_time) if process else None


def update_live(paths: VMPaths, **changes: Any) -> None:
    """Change live.json for the QEMU that runs now (a record of an older process is replaced)."""
    process = procfs.find_qemu(paths)
    if process is not None:
        files.update_live(paths, process.pid, process.start_time, **changes)


PENDING = "unplug pending: the guest has not released the device; a later reconcile or a reset finishes it"


async def unplug_disk(qmp: Monitor, paths: VMPaths, disk: str) -> str:
    if not await _unplug(qmp, paths, disk_node(disk)):
        return PENDING
    nodes = await block_nodes(qmp)
    for node in (disk_node(disk), disk_file_node(disk), backing_node(disk), backing_file_node(disk)):
        if node in nodes:
            await qmp.execute("blockdev-del", {"node-name": node})
    return "unplugged; the disk file is kept"


async def hotplug_nic(qmp: Monitor, vm: VirtualMachine, nic_name: str, bridges: dict[str, str]) -> str:
    nic = next(n for n in vm.spec.networks if n.name == nic_name)
    device = nic_device(nic.name)
    if device in await peripheral_ids(qmp):
        return "already plugged"
    netdev: dict[str, Any] = {"type": "user", "id": nic_netdev(nic.name)}
    if nic.type == "bridge":
        netdev = await _pass_tap(qmp, vm, nic, bridges[nic.name])
    else:
        if nic.portForwards:
            netdev["hostfwd"] = [{"str": forward} for forward in host_forwards(nic)]
        if nic.restrict:
            netdev["restrict"] = True
    with contextlib.suppress(MonitorError):  # left over by an interrupted earlier attempt: reuse it
        await qmp.execute("netdev_add", netdev)
    bus = await _free_bus(qmp, vm)
    await qmp.execute("device_add", nic_device_args(vm.name, nic, bus), timeout=DEVICE_TIMEOUT)
    await _confirm_present(qmp, device)
    return f"plugged on {bus or 'pci.0'}"


async def _pass_tap(qmp: Monitor, vm: VirtualMachine, nic: NetworkInterfaceSpec, bridge: str) -> dict[str, Any]:
    """Create the NIC's TAP and hand its fds to QEMU over the monitor socket (SCM_RIGHTS + getfd)."""
    fds = await threads.run(hostnet.open_tap, tap_name(vm.name, nic.name), bridge, nic.queues,
                                  nic_mac(vm.name, nic))
    names = [f"{nic_netdev(nic.name)}-q{index}" for index in range(len(fds))]
    try:
        for fd, name in zip(fds, names, strict=True):
            qmp.client.send_fd_scm(fd)
            await qmp.execute("getfd", {"fdname": name})
    finally:
        hostnet.close_all(fds)
    netdev: dict[str, Any] = {"type": "tap", "id": nic_netdev(nic.name), "vhost": False}
    if len(names) == 1:
        netdev["fd"] = names[0]
    else:
        netdev["fds"] = ":".join(names)
    return netdev


async def unplug_nic(qmp: Monitor, paths: VMPaths, nic: str) -> str:
    if not await _unplug(qmp, paths, nic_device(nic)):
        return PENDING
    with contextlib.suppress(MonitorError):  # already gone
        await qmp.execute("netdev_del", {"id": nic_netdev(nic)})
    update_live(paths, links={nic: "up"})
    return "unplugged"


async def set_link(qmp: Monitor, paths: VMPaths, nic: str, up: bool) -> str:
    await qmp.execute("set_link", {"name": nic_device(nic), "up": up})
    update_live(paths, links={nic: "up" if up else "down"})
    return "up" if up else "down"


async def hotplug_cdrom(qmp: Monitor, cdrom: str, image: str | None) -> str:
    device = cdrom_device(cdrom)
    if device in await peripheral_ids(qmp):
        return "already plugged"
    args: dict[str, Any] = {"driver": "scsi-cd", "id": device, "bus": f"{SCSI_CONTROLLER}.0"}
    if image:
        if device not in await block_nodes(qmp):
            filename = await _add_fd(qmp, disks.open_read_only(image), image)
            await qmp.execute("blockdev-add", cdrom_blockdev(cdrom, filename))
        args["drive"] = device
    await qmp.execute("device_add", args, timeout=DEVICE_TIMEOUT)
    await _confirm_present(qmp, device)
    return "plugged"


async def unplug_cdrom(qmp: Monitor, paths: VMPaths, cdrom: str) -> str:
    if not await _unplug(qmp, paths, cdrom_device(cdrom)):
        return PENDING
    if cdrom_device(cdrom) in await block_nodes(qmp):
        await qmp.execute("blockdev-del", {"node-name": cdrom_device(cdrom)})
    return "unplugged"


async def change_media(qmp: Monitor, cdrom: str, image: str | None) -> str:
    """Open the tray, take the medium out, put the new one in, close: node names stay predictable."""
    device = cdrom_device(cdrom)
    await qmp.execute("blockdev-open-tray", {"id": device, "force": True})
    await qmp.execute("blockdev-remove-medium", {"id": device})
    if device in await block_nodes(qmp):
        await qmp.execute("blockdev-del", {"node-name": device})
    if image:
        filename = await _add_fd(qmp, disks.open_read_only(image), image)
        await qmp.execute("blockdev-add", cdrom_blockdev(cdrom, filename))
        await _insert_medium(qmp, device)
    await qmp.execute("blockdev-close-tray", {"id": device})
    return f"inserted {image}" if image else "ejected"


INSERT_TRIES = 5


async def _insert_medium(qmp: Monitor, device: str) -> None:
    """Insert the medium node ``device`` into its open tray. A guest that opens the drive meanwhile (Linux
    does when it polls /dev/sr0) closes an empty tray again, so the insert can find it shut: open it again
    and retry a few times."""
    for attempt in range(INSERT_TRIES):
        try:
            await qmp.execute("blockdev-insert-medium", {"id": device, "node-name": device})
            return
        except MonitorError as exc:
            if "Tray" not in str(exc) or attempt == INSERT_TRIES - 1:
                raise
            await qmp.execute("blockdev-open-tray", {"id": device, "force": True})


async def add_cpus(qmp: Monitor, count: int) -> str:
    have = len(await qmp.execute("query-cpus-fast"))
    if have >= count:
        return f"already {have} vCPUs"
    slots = [s for s in await qmp.execute("query-hotpluggable-cpus") if "qom-path" not in s]
    slots.sort(key=lambda s: tuple(s["props"].get(k, 0) for k in ("socket-id", "core-id", "thread-id")))
    for slot in slots[: count - have]:
        props = slot["props"]
        ident = "cpu-" + "-".join(str(props.get(k, 0)) for k in ("socket-id", "core-id", "thread-id"))
        await qmp.execute("device_add", {"driver": slot["type"], "id": ident, **props}, timeout=DEVICE_TIMEOUT)
    now = len(await qmp.execute("query-cpus-fast"))
    if now != count:
        raise StepFailed(f"asked for {count} vCPUs, QEMU has {now}")
    return f"{have} -> {now} vCPUs"


async def add_memory(qmp: Monitor, size: int, hugepages: str | None = None) -> str:
    """A pc-dimm of ``size``; on hugepages (``hugepages``: the hugetlbfs directory) when the base memory is."""
    devices = await peripheral_ids(qmp)
    index = next(i for i in range(64) if f"dimm-{i}" not in devices)
    backend = f"mem-dimm-{index}"
    memory = (hugepage_backend(backend, size, hugepages) if hugepages is not None
              else {"qom-type": "memory-backend-ram", "id": backend, "size": size})
    with contextlib.suppress(MonitorError):  # left over by an interrupted earlier attempt: reuse it
        await qmp.execute("object-add", memory)
    await qmp.execute("device_add", {"driver": "pc-dimm", "id": f"dimm-{index}", "memdev": backend},
                      timeout=DEVICE_TIMEOUT)
    await _confirm_present(qmp, f"dimm-{index}")
    return f"dimm-{index} of {size // 1024**2} MiB" + (" on hugepages" if hugepages else "")


async def set_balloon(qmp: Monitor, paths: VMPaths, size: int) -> str:
    await qmp.execute("balloon", {"value": size})
    update_live(paths, balloon_target=size)
    return f"target {size // 1024**2} MiB"


def needs_after_start(vm: VirtualMachine) -> bool:
    """Whether ``after_start`` has anything to set (else the start opens no second monitor session)."""
    return any(nic.link == "down" for nic in vm.spec.networks) or any(d.iops or d.bps for d in vm.spec.disks)


async def after_start(qmp: Monitor, paths: VMPaths, vm: VirtualMachine) -> list[str]:
    """Settings QEMU has no command-line option for: links that start down, I/O limits."""
    done = []
    for nic in vm.spec.networks:
        if nic.link == "down":
            done.append(f"{nic.name} link " + await set_link(qmp, paths, nic.name, False))
    for disk in vm.spec.disks:
        if disk.iops or disk.bps:
            done.append(f"{disk.name} " + await set_io_limits(qmp, disk.name, disk.iops, disk.bps))
    return done
