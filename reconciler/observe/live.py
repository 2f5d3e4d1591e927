"""Read a running VM's live configuration over QMP: devices, block nodes, I/O limits, vCPUs, memory, slots.

Called by the snapshot builder for every running VM. Like pyinfra's facts, a query and its parser are
kept apart: ``query_live`` only asks QEMU, pipelined (``qom-list``, ``query-block``, ``query-named-block-nodes``,
``query-pci``, ``query-vnc``, ``query-spice``, ``query-cpus-fast``, ``query-memory-size-summary``,
``query-memory-devices``, ``info network``, ``qom-get`` of each NIC's MAC; over ``adapters.qmpquery``)
and ``parse_live`` turns the answers into ``LiveState`` without I/O (unit-tested on recorded answers).
QEMU 7.2 cannot report a NIC's link state or a balloon target back, so those come from ``live.json``
(``LiveRecord``), which the executor writes and which is only trusted for the process it names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reconciler.adapters.monitor import free_spare_ports, peripheral_types
from reconciler.adapters.qmpquery import Query, QueryError, QuerySession
from reconciler.plan.observed import LiveCdrom, LiveDisk, LiveDisplay, LiveNic, LiveState
from reconciler.qemu.hostdev import USB_CONTROLLER
from reconciler.spec.models import VirtualMachineSpec
from reconciler.spec.units import parse_size
from reconciler.state.models import LiveRecord

_NETDEV_LINE = re.compile(r"^[\s\\]*(net-[a-z0-9-]+):", re.MULTILINE)


@dataclass(frozen=True)
class LiveAnswers:
    """QEMU's raw answers to the live queries, as QMP returned them."""

    devices: dict[str, str]  # device id -> QOM type
    nodes: set[str]
    block: list[dict[str, Any]]
    network_info: str  # HMP "info network": QEMU 7.2 has no query-netdev
    macs: dict[str, str]  # NIC device id -> MAC
    cpus: int
    memory_summary: dict[str, Any]
    memory_devices: list[dict[str, Any]]
    pci: list[dict[str, Any]]
    fdsets: list[dict[str, Any]] = field(default_factory=list)  # query-fdsets: media are handed over as fds
    vnc: dict[str, Any] | None = None  # query-vnc
    spice: dict[str, Any] | None = None  # query-spice
    vcpu_threads: dict[int, int] = field(default_factory=dict)  # query-cpus-fast: cpu-index -> thread-id
    named_nodes: list[dict[str, Any]] = field(default_factory=list)  # query-named-block-nodes, flat
    status: str = "unknown"  # query-status: "running", "paused", ...


def _strip(prefix: str, name: str) -> str | None:
    return name[len(prefix):] if name.startswith(prefix) else None


# What every running QEMU is asked. Each QMP command costs the QEMU ~0.3-0.4 ms of CPU under TCG, which a
# plan over many VMs waits for (docs/performance.md): what the command line or the first answers settle is
# not asked at all.
_ALWAYS: tuple[Query, ...] = (
    ("query-status", None), ("qom-list", {"path": "/machine/peripheral"}), ("query-cpus-fast", None),
    ("query-named-block-nodes", {"flat": True}), ("query-block", None),
    ("human-monitor-command", {"command-line": "info network"}), ("query-pci", None))
# A display query only of a QEMU started with its option: neither server can be created after start-up
# (QMP's ``display-update`` only moves a VNC server that exists).
_DISPLAYS: tuple[tuple[str, str], ...] = (("query-vnc", "-vnc"), ("query-spice", "-spice"))


def _memory_option(cmdline: Sequence[str] | None) -> str | None:
    if not cmdline or "-m" not in cmdline[:-1]:
        return None
    return cmdline[list(cmdline).index("-m") + 1]


def base_memory(cmdline: Sequence[str] | None) -> int | None:
    """The RAM QEMU was started with (``-m size=...``, bytes), which cannot change while it runs; None when the
    command line is unknown or says it another way (then ``query-memory-size-summary`` is asked)."""
    if (option := _memory_option(cmdline)) is None:
        return None
    for position, part in enumerate(option.split(",")):
        key, equals, value = part.partition("=")
        size = value if key == "size" else key if not equals and position == 0 else None
        if size is not None:
            if size.isdigit():
                return None  # a bare number is MiB to QEMU, bytes to parse_size: not ours to guess
            try:
                return parse_size(size)
            except ValueError:
                return None
    return None


def may_have_memory_devices(cmdline: Sequence[str] | None) -> bool:
    """A DIMM (or any memory device) needs device memory, which only ``-m ...,maxmem=`` reserves: without it,
    ``query-memory-devices`` could only answer an empty list."""
    option = _memory_option(cmdline)
    return option is None or "maxmem=" in option


def _qdev(block: dict[str, Any]) -> str:
    """The device id a ``query-block`` entry belongs to (``disk-root``, ``cd-install``)."""
    return str(block.get("qdev", "")).removeprefix("/machine/peripheral/").removesuffix("/virtio-backend")


def _cd_from_fdset(block: list[dict[str, Any]]) -> bool:
    """A CD-ROM drive holds a medium opened from an fd set (whose opaque, from query-fdsets, names its path)."""
    return any(_strip("cd-", _qdev(entry)) is not None
               and str((entry.get("inserted") or {}).get("file", "")).startswith("/dev/fdset/")
               for entry in block)


def _first_queries(cmdline: Sequence[str] | None, base: int | None) -> tuple[list[Query], set[str]]:
    """The first batch for a QEMU with this command line (and base memory, from it), and which of its
    commands may be refused."""
    displays = [command for command, option in _DISPLAYS if cmdline is None or option in cmdline]
    first = [*_ALWAYS, *([("query-memory-size-summary", None)] if base is None else []),
             *([("query-memory-devices", None)] if may_have_memory_devices(cmdline) else []),
             *((command, None) for command in displays)]
    return first, set(displays)


def _raise_refusals(answers: Iterable[Any]) -> None:
    for answer in answers:
        if isinstance(answer, QueryError):
            raise answer


def _memory_summary(answered: Mapping[str, Any], base: int | None) -> dict[str, Any]:
    """``query-memory-size-summary``'s answer, or the same from the command line's base memory and the
    memory devices (each one's plugged size)."""
    summary: dict[str, Any] = answered.get("query-memory-size-summary") or {
        "base-memory": base, "plugged-memory": sum(int((d.get("data") or {}).get("size", 0))
                                                   for d in answered.get("query-memory-devices", []))}
    return summary


async def query_live(qmp: QuerySession, cmdline: Sequence[str] | None = None) -> LiveAnswers:
    """Ask QEMU everything ``parse_live`` needs, in two pipelined batches: the queries, then each NIC's MAC
    (and the fd sets, when a CD-ROM's medium came from one). ``cmdline``: the QEMU's command line as /proc
    shows it (None: unknown; the display servers and the memory size are asked about).

    :raise MonitorError: When a query fails (but a display query: SPICE's module is loaded only with -spice),
        or the connection is lost.
    """
    base = base_memory(cmdline)
    first, may_refuse = _first_queries(cmdline, base)
    answered = dict(zip((name for name, _ in first), await qmp.batch(first), strict=True))
    _raise_refusals(answer for name, answer in answered.items() if name not in may_refuse)
    devices = peripheral_types(answered["qom-list"])
    block = answered["query-block"]
    nics = sorted(d for d in devices if d.startswith("nic-"))
    fdsets = [("query-fdsets", None)] if _cd_from_fdset(block) else []
    second = await qmp.batch([*(("qom-get", {"path": f"/machine/peripheral/{device}", "property": "mac"})
                                for device in nics), *fdsets])
    _raise_refusals(second)
    cpus, nodes = answered["query-cpus-fast"], answered["query-named-block-nodes"]
    return LiveAnswers(
        devices=devices, nodes={n["node-name"] for n in nodes}, block=block,
        network_info=answered["human-monitor-command"], macs=dict(zip(nics, second, strict=False)),
        cpus=len(cpus), vcpu_threads=vcpu_threads(cpus), memory_summary=_memory_summary(answered, base),
        memory_devices=answered.get("query-memory-devices", []), pci=answered["query-pci"],
        fdsets=second[-1] if fdsets else [], vnc=_shown(answered.get("query-vnc")),
        spice=_shown(answered.get("query-spice")), named_nodes=nodes,
        status=str(answered["query-status"].get("status", "unknown")),
    )


def _shown(answer: Any) -> dict[str, Any] | None:
    return answer if isinstance(answer, dict) else None


def _display(answers: LiveAnswers) -> LiveDisplay | None:
    """The display server QEMU runs, as query-vnc / query-spice report it (where it listens, its auth)."""
    for protocol, answer, port_key in (("vnc", answers.vnc, "service"), ("spice", answers.spice, "port")):
        if answer and answer.get("enabled"):
            port = str(answer.get(port_key, ""))
            return LiveDisplay.model_validate({"protocol": protocol, "host": answer.get("host"),
                                               "port": int(port) if port.isdigit() else None,
                                               "auth": answer.get("auth")})
    return None


def _opened_path(answers: LiveAnswers, filename: str | None) -> str | None:
    """The path a medium was opened from: ``/dev/fdset/N`` is the fd set whose opaque names it."""
    if filename is None or not filename.startswith("/dev/fdset/"):
        return filename
    wanted = filename.removeprefix("/dev/fdset/")
    for fdset in answers.fdsets:
        if str(fdset.get("fdset-id")) == wanted:
            return next((fd["opaque"] for fd in fdset.get("fds", []) if fd.get("opaque")), filename)
    return filename


def _block(answers: LiveAnswers) -> tuple[dict[str, tuple[int, int]], dict[str, LiveCdrom]]:
    """Each disk's I/O limits and each CD-ROM drive's medium, from ``query-block``."""
    limits: dict[str, tuple[int, int]] = {}
    cdroms: dict[str, LiveCdrom] = {}
    for block in answers.block:
        qdev = _qdev(block)
        inserted = block.get("inserted")
        if (disk := _strip("disk-", qdev)) is not None and inserted:
            limits[disk] = (int(inserted.get("iops", 0)), int(inserted.get("bps", 0)))
        elif (cdrom := _strip("cd-", qdev)) is not None:
            cdroms[cdrom] = LiveCdrom(image=_opened_path(answers, inserted.get("file")) if inserted else None)
    return limits, cdroms


def _disks(answers: LiveAnswers, limits: dict[str, tuple[int, int]]) -> dict[str, LiveDisk]:
    names = {n for d in answers.devices if (n := _strip("disk-", d))}
    names |= {n for d in answers.nodes if (n := _strip("disk-", d))}
    disks = {}
    for name in sorted(names):
        iops, bps = limits.get(name, (0, 0))
        disks[name] = LiveDisk(device=f"disk-{name}" in answers.devices, node=f"disk-{name}" in answers.nodes,
                               iops=iops, bps=bps, driver=answers.devices.get(f"disk-{name}", ""))
    return disks


def _nics(answers: LiveAnswers, record: LiveRecord) -> dict[str, LiveNic]:
    netdevs = {n for m in _NETDEV_LINE.findall(answers.network_info) if (n := _strip("net-", m))}
    names = {n for d in answers.devices if (n := _strip("nic-", d))} | netdevs
    return {name: LiveNic(device=f"nic-{name}" in answers.devices, netdev=name in netdevs,
                          mac=answers.macs.get(f"nic-{name}"), link=record.links.get(name, "up"))
            for name in sorted(names)}


def _free_slots(answers: LiveAnswers, launched: VirtualMachineSpec | None) -> int:
    if launched is not None and launched.machine.type == "q35":
        return len(free_spare_ports(answers.pci))
    # i440fx hot-plugs straight onto pci.0: the budget is the slots declared minus devices added live.
    if launched is None:
        return 0
    cold = {f"disk-{d.name}" for d in launched.disks} | {f"nic-{n.name}" for n in launched.networks}
    added = [d for d in answers.devices if d.startswith(("disk-", "nic-")) and d not in cold]
    return max(0, launched.hotplugSlots - len(added))


def vcpu_threads(cpus: list[dict[str, Any]]) -> dict[int, int]:
    """``query-cpus-fast``'s answer -> vCPU index -> host thread id."""
    return {int(cpu["cpu-index"]): int(cpu["thread-id"]) for cpu in cpus if "thread-id" in cpu}


def parse_live(answers: LiveAnswers, launched: VirtualMachineSpec | None, record: LiveRecord) -> LiveState:
    """Everything that can change on a running VM without a restart, from QEMU's answers (pure)."""
    limits, cdroms = _block(answers)
    summary = answers.memory_summary
    return LiveState(
        disks=_disks(answers, limits), nics=_nics(answers, record), cdroms=cdroms, cpus=answers.cpus,
        memory=int(summary.get("base-memory", 0)) + int(summary.get("plugged-memory", 0)),
        dimms=len([d for d in answers.memory_devices if d.get("type") == "dimm"]),
        balloon_target=record.balloon_target, free_slots=_free_slots(answers, launched),
        pending_unplugs=sorted(device for device in record.unplugs if device in answers.devices),
        display=_display(answers),
        host_devices=sorted(n for d in answers.devices if (n := _strip("hostdev-", d))),
        usb_controller=USB_CONTROLLER in answers.devices,
        vcpu_threads=answers.vcpu_threads,
    )
