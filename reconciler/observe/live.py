"""Read a running VM's live configuration over QMP: devices, block nodes, I/O limits, vCPUs, memory, slots.

Called by the snapshot builder for every running VM. Only queries (``qom-list``, ``query-block``,
``query-named-block-nodes``, ``query-pci``, ``query-cpus-fast``, ``query-memory-size-summary``,
``query-memory-devices``, ``info network``). QEMU 7.2 cannot report a NIC's link state or a balloon
target back, so those come from ``live.json``, which the executor writes and which is only trusted for
the process it names.
"""

from __future__ import annotations

import re
from typing import Any

from reconciler.observe.monitor import Monitor
from reconciler.observe.records import LiveRecord
from reconciler.plan.observed import LiveCdrom, LiveDisk, LiveNic, LiveState
from reconciler.spec.models import VirtualMachineSpec

_NETDEV_LINE = re.compile(r"^[\s\\]*(net-[a-z0-9-]+):", re.MULTILINE)


def _strip(prefix: str, name: str) -> str | None:
    return name[len(prefix):] if name.startswith(prefix) else None


async def peripheral_ids(qmp: Monitor) -> dict[str, str]:
    """Device id -> QOM type of every device that has an id."""
    entries = await qmp.execute("qom-list", {"path": "/machine/peripheral"})
    return {e["name"]: e["type"].removeprefix("child<").removesuffix(">")
            for e in entries if e["type"].startswith("child<")}


def free_spare_ports(pci: list[dict[str, Any]]) -> list[str]:
    """Spare root ports (``hp-N``) on which nothing is plugged, in order."""
    free = []
    for bus in pci:
        for device in bus.get("devices", []):
            qdev = device.get("qdev_id", "")
            bridge = device.get("pci_bridge")
            if qdev.startswith("hp-") and bridge is not None and not bridge.get("devices"):
                free.append(qdev)
    return sorted(free, key=lambda port: int(port.split("-")[1]))


async def observe_live(qmp: Monitor, launched: VirtualMachineSpec | None, record: LiveRecord) -> LiveState:
    """Everything that can change on a running VM without a restart.

    :raise MonitorError: When a query fails.
    """
    devices = await peripheral_ids(qmp)
    nodes = {n["node-name"] for n in await qmp.execute("query-named-block-nodes", {"flat": True})}
    limits: dict[str, tuple[int, int]] = {}
    cdroms: dict[str, LiveCdrom] = {}
    for block in await qmp.execute("query-block"):
        qdev = block.get("qdev", "").removeprefix("/machine/peripheral/").removesuffix("/virtio-backend")
        inserted = block.get("inserted")
        if (disk := _strip("disk-", qdev)) is not None and inserted:
            limits[disk] = (int(inserted.get("iops", 0)), int(inserted.get("bps", 0)))
        elif (cdrom := _strip("cd-", qdev)) is not None:
            cdroms[cdrom] = LiveCdrom(image=inserted.get("file") if inserted else None)

    disk_names = {n for d in devices if (n := _strip("disk-", d))} | {n for d in nodes if (n := _strip("disk-", d))}
    disks = {}
    for name in sorted(disk_names):
        iops, bps = limits.get(name, (0, 0))
        disks[name] = LiveDisk(device=f"disk-{name}" in devices, node=f"disk-{name}" in nodes, iops=iops, bps=bps)

    network = await qmp.execute("human-monitor-command", {"command-line": "info network"})
    netdevs = {n for m in _NETDEV_LINE.findall(network) if (n := _strip("net-", m))}
    nic_names = {n for d in devices if (n := _strip("nic-", d))} | netdevs
    nics = {}
    for name in sorted(nic_names):
        present = f"nic-{name}" in devices
        mac = await qmp.execute("qom-get", {"path": f"/machine/peripheral/nic-{name}", "property": "mac"}) \
            if present else None
        nics[name] = LiveNic(device=present, netdev=name in netdevs, mac=mac, link=record.links.get(name, "up"))

    cpus = len(await qmp.execute("query-cpus-fast"))
    summary = await qmp.execute("query-memory-size-summary")
    dimms = [d for d in await qmp.execute("query-memory-devices") if d.get("type") == "dimm"]
    if launched is not None and launched.machine.type == "q35":
        free = len(free_spare_ports(await qmp.execute("query-pci")))
    else:
        # i440fx hot-plugs straight onto pci.0: the budget is the slots declared minus devices added live.
        cold = {f"disk-{d.name}" for d in launched.disks} | {f"nic-{n.name}" for n in launched.networks} \
            if launched else set()
        added = [d for d in devices if d.startswith(("disk-", "nic-")) and d not in cold]
        free = max(0, (launched.hotplugSlots if launched else 0) - len(added))
    return LiveState(
        disks=disks, nics=nics, cdroms=cdroms, cpus=cpus,
        memory=int(summary.get("base-memory", 0)) + int(summary.get("plugged-memory", 0)),
        dimms=len(dimms), balloon_target=record.balloon_target, free_slots=free,
        pending_unplugs=sorted(device for device in record.unplugs if device in devices),
    )

