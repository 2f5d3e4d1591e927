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
from typing import Any

from reconciler.spec.layout import VMPaths, disk_file_node, disk_node, nic_device, nic_netdev
from reconciler.spec.models import VirtualMachineSpec, nic_mac

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


def build_argv(name: str, spec: VirtualMachineSpec, paths: VMPaths, binary: str = QEMU_BINARY) -> list[str]:
    """The full argv that starts ``name`` daemonized, with its monitors, serial log and pidfile."""
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
    cpu = spec.cpu
    argv += ["-smp", _kv(str(cpu.count), sockets=cpu.sockets, cores=cpu.cores, threads=cpu.threads)]
    argv += ["-m", _kv("", size=f"{spec.memory.size // 1024**2}M")]
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
    for disk in spec.disks:
        argv += [
            "-blockdev",
            _json({"driver": "file", "node-name": disk_file_node(disk.name), "filename": str(paths.disk(disk.name))}),
            "-blockdev",
            _json({"driver": "qcow2", "node-name": disk_node(disk.name), "file": disk_file_node(disk.name)}),
            "-device",
            _json({"driver": "virtio-blk-pci", "id": disk_node(disk.name), "drive": disk_node(disk.name),
                   "serial": disk.name}),
        ]
    for nic in spec.networks:
        forwards = [
            f"hostfwd={_safe(f'{fwd.protocol}:{fwd.hostAddress}:{fwd.host}-:{fwd.guest}')}"
            for fwd in nic.portForwards
        ]
        argv += [
            "-netdev", ",".join([_kv("user", id=nic_netdev(nic.name)), *forwards]),
            "-device",
            _json({"driver": "virtio-net-pci", "id": nic_device(nic.name), "netdev": nic_netdev(nic.name),
                   "mac": nic_mac(name, nic)}),
        ]
    argv += ["-pidfile", str(paths.pidfile), "-daemonize"]
    return argv
