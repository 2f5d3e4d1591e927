"""Build the QEMU argv for a VM: a pure function of its name, spec and paths.

Called by the executor just before it starts QEMU (the argv is also recorded in ``launch.json`` so the
observer can check that the running process is the one we started). QEMU is never run through a shell.
Devices and block nodes use QEMU's JSON option syntax, so their values need no escaping; the few
``key=value`` options left are built only from values the spec models validated (no ',' '=' or control
characters), and ``_kv`` checks again as a last line of defence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from reconciler.spec.models import NetworkInterfaceSpec, VirtualMachineSpec, nic_mac
from reconciler.spec.naming import (
    BALLOON_DEVICE,
    SCSI_CONTROLLER,
    cdrom_device,
    cdrom_file_node,
    disk_file_node,
    disk_node,
    nic_device,
    nic_netdev,
    root_port,
    spare_port,
)
from reconciler.state.layout import VMPaths

QEMU_BINARY = "qemu-system-x86_64"
_UNSAFE = re.compile(r"[,=\x00-\x1f\x7f]")


class UnsafeOptionValue(ValueError):
    """A value would change the meaning of a QEMU option string."""


def _safe(value: object) -> str:
    text = str(value)
    if _UNSAFE.search(text):
        raise UnsafeOptionValue(f"refusing QEMU option value {text!r}: it contains ',' '=' or a control character")
    return text


def _kv(head: str, **options: object) -> str:
    parts = [_safe(head)] if head else []
    parts += [f"{key.replace('_', '-')}={_safe(value)}" for key, value in options.items()]
    return ",".join(parts)


def _json(options: dict[str, Any]) -> str:
    return json.dumps(options, separators=(",", ":"), sort_keys=False)


def build_argv(
    name: str,
    spec: VirtualMachineSpec,
    paths: VMPaths,
    binary: str = QEMU_BINARY,
    taps: Mapping[str, list[int]] | None = None,
    vhost: bool = False,
) -> list[str]:
    """The full argv that starts ``name`` daemonized, with its monitors, serial log and pidfile.

    ``taps`` gives, for each bridged NIC, the file descriptors of its TAP queues (inherited by QEMU).
    """
    taps = taps or {}
    paths.check()
    argv = [
        binary,
        "-name", _kv("", guest=name, debug_threads="on"),
        "-nodefaults",
        "-no-user-config",
        "-machine", _kv(spec.machine.type),
    ]
    for accel in spec.machine.accel:
        argv += ["-accel", _kv(accel)]
    if spec.cpu.model:
        argv += ["-cpu", _kv(spec.cpu.model)]
    argv += _cpu_and_memory(spec)
    argv += ["-display", "none", "-vga", "none"]
    argv += [
        "-chardev", _kv("socket", id="qmp", path=paths.qmp, server="on", wait="off"),
        "-mon", _kv("", chardev="qmp", mode="control"),
        "-chardev", _kv("socket", id="qmp-events", path=paths.events, server="on", wait="off"),
        "-mon", _kv("", chardev="qmp-events", mode="control"),
        "-chardev", _kv("file", id="serial0", path=paths.serial, append="on"),
        "-serial", "chardev:serial0",
    ]
    if spec.boot is not None:
        # -kernel/-initrd/-append take their argument verbatim (no option parsing), so the kernel
        # command line may contain commas, e.g. console=ttyS0,115200.
        argv += ["-kernel", _safe(spec.boot.kernel)]
        if spec.boot.initrd:
            argv += ["-initrd", _safe(spec.boot.initrd)]
        if spec.boot.cmdline:
            argv += ["-append", spec.boot.cmdline]
    pcie = spec.machine.type == "q35"
    chassis = iter(range(1, 256))
    for disk in spec.disks:
        argv += _port(pcie, disk_node(disk.name), next(chassis))
        argv += ["-blockdev", _json(disk_file_blockdev(disk.name, str(paths.disk(disk.name)))),
                 "-blockdev", _json(disk_format_blockdev(disk.name))]
        argv += ["-device", _json(disk_device_args(disk.name, root_port(disk_node(disk.name)) if pcie else None))]
    for nic in spec.networks:
        argv += _port(pcie, nic_device(nic.name), next(chassis))
        if nic.type == "bridge":
            fds = taps.get(nic.name)
            if not fds:
                raise ValueError(f"NIC {nic.name}: no TAP file descriptor to hand to QEMU")
            fd_option = {"fd": fds[0]} if len(fds) == 1 else {"fds": ":".join(map(str, fds))}
            argv += ["-netdev", _kv("tap", id=nic_netdev(nic.name), **fd_option, vhost="on" if vhost else "off")]
        else:
            forwards = [f"hostfwd={_safe(forward)}" for forward in host_forwards(nic)]
            argv += ["-netdev", ",".join([_kv("user", id=nic_netdev(nic.name)), *forwards])]
        argv += ["-device", _json(nic_device_args(name, nic, root_port(nic_device(nic.name)) if pcie else None))]
    if pcie:
        for index in range(spec.hotplugSlots):
            argv += ["-device", _json({"driver": "pcie-root-port", "id": spare_port(index), "chassis": next(chassis),
                                       "bus": "pcie.0"})]
    argv += ["-device", _json({"driver": "virtio-scsi-pci", "id": SCSI_CONTROLLER})]
    for cdrom in spec.cdroms:
        device: dict[str, Any] = {"driver": "scsi-cd", "id": cdrom_device(cdrom.name), "bus": f"{SCSI_CONTROLLER}.0"}
        if cdrom.image:
            argv += ["-blockdev", _json(cdrom_blockdev(cdrom.name, cdrom.image))]
            device["drive"] = cdrom_device(cdrom.name)
        argv += ["-device", _json(device)]
    if spec.memory.balloon:
        argv += ["-device", _json({"driver": "virtio-balloon-pci", "id": BALLOON_DEVICE})]
    argv += ["-pidfile", str(paths.pidfile), "-daemonize"]
    return argv


def _cpu_and_memory(spec: VirtualMachineSpec) -> list[str]:
    cpu, memory = spec.cpu, spec.memory
    # vCPUs are hot-plugged as cores: the topology QEMU sees is sized for maxCpus.
    max_cores = cpu.max_count // (cpu.sockets * cpu.threads)
    smp = _kv(str(cpu.count), sockets=cpu.sockets, cores=max_cores, threads=cpu.threads, maxcpus=cpu.max_count)
    mem = {"size": f"{memory.size // 1024**2}M"}
    if memory.maxSize is not None and memory.maxSize > memory.size:
        mem.update(slots=str(memory.slots), maxmem=f"{memory.maxSize // 1024**2}M")
    return ["-smp", smp, "-m", _kv("", **mem)]


def _port(pcie: bool, device_id: str, chassis: int) -> list[str]:
    if not pcie:
        return []
    return ["-device", _json({"driver": "pcie-root-port", "id": root_port(device_id), "chassis": chassis,
                              "bus": "pcie.0"})]


def host_forwards(nic: NetworkInterfaceSpec) -> list[str]:
    return [f"{fwd.protocol}:{fwd.hostAddress}:{fwd.host}-:{fwd.guest}" for fwd in nic.portForwards]


def disk_file_blockdev(disk_name: str, path: str) -> dict[str, Any]:
    return {"driver": "file", "node-name": disk_file_node(disk_name), "filename": path}


def disk_format_blockdev(disk_name: str) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": disk_node(disk_name), "file": disk_file_node(disk_name)}


def disk_device_args(disk_name: str, bus: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {"driver": "virtio-blk-pci", "id": disk_node(disk_name), "drive": disk_node(disk_name),
                            "serial": disk_name}
    if bus:
        args["bus"] = bus
    return args


def nic_device_args(vm_name: str, nic: NetworkInterfaceSpec, bus: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {"driver": "virtio-net-pci", "id": nic_device(nic.name), "netdev": nic_netdev(nic.name),
                            "mac": nic_mac(vm_name, nic)}
    if nic.queues > 1:
        args.update({"mq": True, "vectors": 2 * nic.queues + 2})
    if bus:
        args["bus"] = bus
    return args


def cdrom_blockdev(cdrom_name: str, image: str) -> dict[str, Any]:
    return {"driver": "raw", "node-name": cdrom_device(cdrom_name), "read-only": True,
            "file": {"driver": "file", "node-name": cdrom_file_node(cdrom_name), "filename": image,
                     "read-only": True}}
