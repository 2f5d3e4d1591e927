"""Build the QEMU argv for a VM: a pure function of its name, spec and paths.

Called by the executor just before it starts QEMU (the argv is also recorded in ``launch.json`` so the
observer can check that the running process is the one we started). QEMU runs in the foreground under
its seccomp sandbox (``SANDBOX``; ``apply.vmprocess`` detaches it and drops its privileges). With
``files`` (what the executor opened for it), disks, backing images and CD-ROM media are QEMU fd sets
(``-add-fd``, ``/dev/fdset/N``) and the kernel and initrd are QEMU's private copies: QEMU's user needs
no access to any of those paths.
Devices and block nodes use QEMU's JSON option syntax, so their values need no escaping; the few
``key=value`` options left are built only from values the spec models validated (no ',' '=' or control
characters), and ``_kv`` checks again as a last line of defence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.errors import Refused, UnsafeValue
from reconciler.qemu import hostdev
from reconciler.qemu.display import display_argv, has_vdagent, vdagent_argv
from reconciler.spec.hostdev import HostDeviceSpec
from reconciler.spec.models import (
    AGENT_PORT,
    DiskSpec,
    NetworkInterfaceSpec,
    VirtualMachineSpec,
    cpu_model,
    nic_mac,
    sata_port,
)
from reconciler.spec.naming import (
    AGENT_CHARDEV,
    AGENT_DEVICE,
    BALLOON_DEVICE,
    RNG_DEVICE,
    RNG_OBJECT,
    SCSI_CONTROLLER,
    SERIAL_CONTROLLER,
    TPM_BACKEND,
    TPM_CHARDEV,
    TPM_DEVICE,
    backing_file_node,
    backing_node,
    boot_indices,
    cdrom_device,
    cdrom_file_node,
    channel_chardev,
    channel_device,
    channel_key,
    disk_file_node,
    disk_node,
    firmware_file_node,
    firmware_node,
    host_device,
    nic_device,
    nic_netdev,
    root_port,
    smbios_uuid,
    spare_port,
)
from reconciler.state.layout import VMPaths
from reconciler.state.models import SHUTDOWN_TRACE

QEMU_BINARY = "qemu-system-x86_64"
_UNSAFE = re.compile(r"[,=\x00-\x1f\x7f]")
# QEMU's seccomp filter: no obsolete syscalls, no setuid/setgid, no fork/exec, no scheduler/affinity
# changes. QEMU 7.2 kills a -daemonize'd QEMU under spawn=deny, so it is never daemonized (see vmprocess).
# A bootOnce CD-ROM during its install start: first of the devices (index 0 is QEMU's own linuxboot ROM
# under -kernel, so a direct kernel boot still wins).
BOOT_ONCE_INDEX = 1
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def fdset_path(fdset: int) -> str:
    return f"/dev/fdset/{fdset}"


@dataclass(frozen=True)
class OpenedFiles:
    """What the executor opened for QEMU: fd set ids by disk / backing image / CD-ROM name, the fd in each
    set (``-add-fd``; inherited by QEMU), and QEMU's private copies of the kernel and initrd."""

    disks: Mapping[str, int] = field(default_factory=dict)
    backing: Mapping[str, int] = field(default_factory=dict)
    cdroms: Mapping[str, int] = field(default_factory=dict)
    fds: Mapping[int, int] = field(default_factory=dict)  # fd set id -> file descriptor
    names: Mapping[int, str] = field(default_factory=dict)  # fd set id -> the path it was opened from
    vhost: Mapping[str, list[int]] = field(default_factory=dict)  # bridged NIC -> /dev/vhost-net fds, per queue
    kernel: str | None = None
    initrd: str | None = None
    firmware: Mapping[str, int] = field(default_factory=dict)  # UEFI: fd set id of "code" and of "vars"
    hugepages: str | None = None  # the private hugetlbfs directory the guest's memory is backed by


MEMORY_BACKEND = "mem-base"


class UnsafeOptionValue(UnsafeValue):
    """A value would change the meaning of a QEMU option string (a ``ValueError`` too, on the one error root)."""


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
    files: OpenedFiles | None = None,
) -> list[str]:
    """The full argv that starts ``name`` in the foreground, sandboxed, with its monitors, serial log and
    pidfile.

    ``taps`` gives, for each bridged NIC, the file descriptors of its TAP queues (inherited by QEMU);
    ``files`` the fd sets and boot-file copies (without it QEMU opens the spec's paths itself).
    """
    paths.check()
    opened = files or OpenedFiles()
    pcie = spec.machine.type == "q35"
    # One chassis number per PCIe root port, in argv order: disks, then NICs, then the spare ports.
    chassis = _chassis_numbers()
    order = boot_indices(spec)
    return [
        *_machine(binary, name, spec),
        "-sandbox", SANDBOX,
        # QEMU writes why it shuts down to its stderr log: a later apply tells a clean power-off from a
        # crash without the sync daemon having watched (state.files.exit_from_log).
        "-trace", f"enable={SHUTDOWN_TRACE}",
        *_cpu_and_memory(spec),
        *_memory_backend(spec, opened),
        "-display", "none", "-vga", "none",
        *_monitors_and_serial(paths),
        *(arg for fdset, fd in sorted(opened.fds.items())
          for arg in ("-add-fd", _kv("", fd=fd, set=fdset, opaque=opened.names.get(fdset, "-")))),
        *_boot(spec, opened),
        *_firmware(spec, opened),
        *(arg for disk in spec.disks if disk.bus != "scsi"
          for arg in _bootindex(_disk(disk, paths, pcie, next(chassis), opened, spec), order.get(f"disk:{disk.name}"))),
        *(arg for nic in spec.networks
          for arg in _nic(name, nic, taps or {}, vhost, pcie, next(chassis), opened.vhost.get(nic.name))),
        *(arg for device in spec.hostDevices if device.pci
          for arg in _host_pci(device, pcie, next(chassis))),
        *_spare_ports(spec, pcie, chassis),
        "-device", _json({"driver": "virtio-scsi-pci", "id": SCSI_CONTROLLER}),
        *(arg for disk in spec.disks if disk.bus == "scsi"
          for arg in _bootindex(_disk(disk, paths, pcie, 0, opened, spec), order.get(f"disk:{disk.name}"))),
        *(arg for cdrom in spec.cdroms for arg in _cdrom(
            cdrom.name, cdrom.image, opened.cdroms.get(cdrom.name),
            BOOT_ONCE_INDEX if cdrom.bootOnce else order.get(f"cdrom:{cdrom.name}"))),
        *install_action(spec),
        *_balloon(spec),
        *_rng(spec),
        *_tpm(spec, paths),
        *display_argv(spec),
        *_serial_ports(spec, paths),
        *_host_usb(spec),
        "-pidfile", str(paths.pidfile),
    ]


def _host_pci(device: HostDeviceSpec, pcie: bool, chassis: int) -> list[str]:
    """A passed-through PCI function on its own root port (so it can be unplugged live)."""
    port = host_device(device.name)
    return [*_port(pcie, port, chassis), "-device", _json(hostdev.vfio_pci_args(device, root_port(port)))]


def _host_usb(spec: VirtualMachineSpec) -> list[str]:
    """The xHCI controller and each passed-through USB device on it."""
    if not hostdev.needs_xhci(spec):
        return []
    argv = ["-device", _json(hostdev.xhci_args())]
    for device in spec.hostDevices:
        if device.usb is not None:
            argv += ["-device", _json(hostdev.usb_host_args(device))]
    return argv


def _machine(binary: str, name: str, spec: VirtualMachineSpec) -> list[str]:
    argv = [
        binary,
        "-name", _kv("", guest=name, debug_threads="on"),
        "-nodefaults",
        "-no-user-config",
        "-machine", _kv(spec.machine.type, **({"memory_backend": MEMORY_BACKEND} if spec.memory.hugepages else {})),
        "-uuid", _safe(smbios_uuid(name)),
    ]
    for accel in spec.machine.accel:
        argv += ["-accel", _kv(accel)]
    if model := cpu_model(spec):
        argv += ["-cpu", _kv(model)]
    if spec.paused:
        argv.append("-S")  # spec.paused: no guest code runs until `cont` (a restart of a paused VM stays paused)
    return argv


def _monitors_and_serial(paths: VMPaths) -> list[str]:
    """Two QMP monitors (one for short-lived clients, one kept by the sync daemon's event listener)."""
    return [
        "-chardev", _kv("socket", id="qmp", path=paths.qmp, server="on", wait="off"),
        "-mon", _kv("", chardev="qmp", mode="control"),
        "-chardev", _kv("socket", id="qmp-events", path=paths.events, server="on", wait="off"),
        "-mon", _kv("", chardev="qmp-events", mode="control"),
        "-chardev", _kv("file", id="serial0", path=paths.serial, append="on"),
        "-serial", "chardev:serial0",
    ]


def _boot(spec: VirtualMachineSpec, opened: OpenedFiles) -> list[str]:
    if spec.boot is None:
        return []
    # -kernel/-initrd/-append take their argument verbatim (no option parsing), so the kernel
    # command line may contain commas, e.g. console=ttyS0,115200.
    argv = ["-kernel", _safe(opened.kernel or spec.boot.kernel)]
    if spec.boot.initrd:
        argv += ["-initrd", _safe(opened.initrd or spec.boot.initrd)]
    if spec.boot.cmdline:
        argv += ["-append", spec.boot.cmdline]
    return argv


def _firmware(spec: VirtualMachineSpec, opened: OpenedFiles) -> list[str]:
    """UEFI: OVMF's code read-only on pflash0 and the VM's variable store on pflash1, both fd sets (QEMU's
    user opens no firmware path); Secure Boot also needs SMM and a pflash only SMM code may write."""
    if spec.firmware.type != "uefi":
        return []
    if "code" not in opened.firmware or "vars" not in opened.firmware:
        raise ValueError("UEFI: the firmware code and the VM's variable store must be opened for QEMU (fd sets)")
    argv: list[str] = []
    for what, read_only in (("code", True), ("vars", False)):
        argv += ["-blockdev", _json({"driver": "file", "node-name": firmware_file_node(what),
                                     "filename": fdset_path(opened.firmware[what]), "read-only": read_only}),
                 "-blockdev", _json({"driver": "raw", "node-name": firmware_node(what),
                                     "file": firmware_file_node(what), "read-only": read_only})]
    argv += ["-machine", _kv("", pflash0=firmware_node("code"), pflash1=firmware_node("vars"))]
    if spec.firmware.secureBoot:
        argv += ["-machine", "smm=on", "-global", _kv("", driver="cfi.pflash01", property="secure", value="on")]
    return argv


def _bootindex(argv: list[str], index: int | None) -> list[str]:
    """``argv`` with ``bootindex`` added to its (last) ``-device``: the device's place in the boot order."""
    if index is None:
        return argv
    device = json.loads(argv[-1])
    return [*argv[:-1], _json({**device, "bootindex": index})]


def _disk(disk: DiskSpec, paths: VMPaths, pcie: bool, chassis: int, opened: OpenedFiles,
          spec: VirtualMachineSpec | None = None) -> list[str]:
    fdset = opened.disks.get(disk.name)
    base = opened.backing.get(disk.name)
    backing = [] if base is None else backing_blockdevs(disk.name, fdset_path(base), disk.imageFormat)
    on_port = pcie and disk.bus == "virtio"  # scsi and sata disks sit on their controllers
    ahci = sata_port(spec, disk.name) if spec is not None and disk.bus == "sata" else 0
    path = fdset_path(fdset) if fdset else str(paths.disk(disk.name))
    return [
        *_port(on_port, disk_node(disk.name), chassis),
        *(arg for node in backing for arg in ("-blockdev", _json(node))),
        "-blockdev", _json(disk_file_blockdev(disk.name, path, disk)),
        "-blockdev", _json(disk_format_blockdev(disk.name, backing_node(disk.name) if backing else None, disk)),
        "-device", _json(disk_device_args(disk.name, root_port(disk_node(disk.name)) if on_port else None, disk,
                                          ahci)),
    ]


def _nic(vm_name: str, nic: NetworkInterfaceSpec, taps: Mapping[str, list[int]], vhost: bool, pcie: bool,
         chassis: int, vhost_fds: list[int] | None = None) -> list[str]:
    return [
        *_port(pcie, nic_device(nic.name), chassis),
        "-netdev", _netdev(nic, taps, vhost, vhost_fds),
        "-device", _json(nic_device_args(vm_name, nic, root_port(nic_device(nic.name)) if pcie else None)),
    ]


def _netdev(nic: NetworkInterfaceSpec, taps: Mapping[str, list[int]], vhost: bool,
            vhost_fds: list[int] | None = None) -> str:
    if nic.type == "bridge":
        fds = taps.get(nic.name)
        if not fds:
            raise ValueError(f"NIC {nic.name}: no TAP file descriptor to hand to QEMU")
        fd_option: dict[str, object] = {"fd": fds[0]} if len(fds) == 1 else {"fds": ":".join(map(str, fds))}
        if vhost_fds:  # opened for QEMU, which cannot open /dev/vhost-net as its unprivileged user
            one = len(vhost_fds) == 1
            fd_option[("vhostfd" if one else "vhostfds")] = vhost_fds[0] if one else ":".join(map(str, vhost_fds))
        return _kv("tap", id=nic_netdev(nic.name), **fd_option, vhost="on" if vhost or vhost_fds else "off")
    forwards = [f"hostfwd={_safe(forward)}" for forward in host_forwards(nic)]
    restrict = ["restrict=on"] if nic.restrict else []
    return ",".join([_kv("user", id=nic_netdev(nic.name)), *restrict, *forwards])


def _chassis_numbers() -> Iterator[int]:
    """PCIe root port chassis numbers 1..255 (8 bits), then a refusal: a bare ``next()`` past the end would
    raise StopIteration, which inside the executor's coroutine became an uncaught ``RuntimeError: coroutine
    raised StopIteration`` (256 disks) instead of a failed step."""
    yield from range(1, 256)
    raise Refused("more than 255 PCIe root ports (disks, NICs and spare ports): a q35 machine has no more "
                  "chassis numbers; use fewer disks or put them on bus: scsi")


def _spare_ports(spec: VirtualMachineSpec, pcie: bool, chassis: Iterator[int]) -> list[str]:
    """``hotplugSlots`` empty root ports for devices added live (q35 only; ``pc`` plugs into pci.0)."""
    if not pcie:
        return []
    argv: list[str] = []
    for index in range(spec.hotplugSlots):
        argv += ["-device", _json({"driver": "pcie-root-port", "id": spare_port(index), "chassis": next(chassis),
                                   "bus": "pcie.0"})]
    return argv


def _cdrom(cdrom_name: str, image: str | None, fdset: int | None, bootindex: int | None = None) -> list[str]:
    device: dict[str, Any] = {"driver": "scsi-cd", "id": cdrom_device(cdrom_name), "bus": f"{SCSI_CONTROLLER}.0"}
    if bootindex is not None:
        device["bootindex"] = bootindex
    argv: list[str] = []
    if image:
        argv += ["-blockdev", _json(cdrom_blockdev(cdrom_name, fdset_path(fdset) if fdset else image))]
        device["drive"] = cdrom_device(cdrom_name)
    return [*argv, "-device", _json(device)]


def install_action(spec: VirtualMachineSpec) -> list[str]:
    """An install start (a bootOnce CD-ROM boots first): the guest's first reboot ends QEMU, so the next start
    comes without the install medium (what libvirt's on_reboot=destroy does for installers)."""
    return ["-action", "reboot=shutdown"] if any(cdrom.bootOnce for cdrom in spec.cdroms) else []


def _balloon(spec: VirtualMachineSpec) -> list[str]:
    if not spec.memory.balloon:
        return []
    return ["-device", _json({"driver": "virtio-balloon-pci", "id": BALLOON_DEVICE})]


def _rng(spec: VirtualMachineSpec) -> list[str]:
    """A virtio RNG fed from the host's /dev/urandom (QEMU opens it itself, as its user, under its sandbox)."""
    if not spec.rng.enabled:
        return []
    return ["-object", _json({"qom-type": "rng-random", "id": RNG_OBJECT, "filename": "/dev/urandom"}),
            "-device", _json({"driver": "virtio-rng-pci", "id": RNG_DEVICE, "rng": RNG_OBJECT})]


def _tpm(spec: VirtualMachineSpec, paths: VMPaths) -> list[str]:
    """A TPM 2.0 on the CRB interface, backed by the VM's swtpm over its control socket."""
    if not spec.tpm.enabled:
        return []
    return ["-chardev", _kv("socket", id=TPM_CHARDEV, path=paths.tpm_socket),
            "-tpmdev", _kv("emulator", id=TPM_BACKEND, chardev=TPM_CHARDEV),
            "-device", _json({"driver": "tpm-crb", "tpmdev": TPM_BACKEND, "id": TPM_DEVICE})]


def _serial_ports(spec: VirtualMachineSpec, paths: VMPaths) -> list[str]:
    """One virtio-serial controller, SPICE's agent channel, and a ``virtserialport`` per channel (and for the
    guest agent), each on a
    unix socket QEMU listens on in its ``run/`` (``-chardev`` has no JSON syntax in 7.2: ``_kv`` checks)."""
    ports = [(AGENT_PORT, AGENT_CHARDEV, AGENT_DEVICE, paths.agent_socket)] if spec.guestAgent.enabled else []
    ports += [(channel.name, channel_chardev(channel.name), channel_device(channel.name),
               paths.channel_socket(channel_key(channel.name))) for channel in spec.channels]
    if not ports and not has_vdagent(spec):
        return []
    argv = ["-device", _json({"driver": "virtio-serial-pci", "id": SERIAL_CONTROLLER})]
    if has_vdagent(spec):
        argv += vdagent_argv(SERIAL_CONTROLLER)
    for port_name, chardev, device, socket in ports:
        argv += ["-chardev", _kv("socket", id=chardev, path=socket, server="on", wait="off"),
                 "-device", _json({"driver": "virtserialport", "bus": f"{SERIAL_CONTROLLER}.0", "chardev": chardev,
                                   "name": _safe(port_name), "id": device})]
    return argv


def swtpm_argv(paths: VMPaths, binary: str = "swtpm") -> list[str]:
    """The VM's swtpm (TPM 2.0) in the foreground: its state in ``tpm/NAME/``, its control socket in QEMU's
    ``run/``, its pidfile there too, its errors on stderr; it exits when QEMU's connection is lost."""
    paths.check()
    return [binary, "socket", "--tpm2",
            "--tpmstate", _kv("", dir=paths.tpm_state, mode="0600"),
            "--ctrl", _kv("", type="unixio", path=paths.tpm_socket, mode="0600"),
            "--pid", _kv("", file=paths.tpm_pidfile),
            "--terminate"]  # errors go to stderr (vms/NAME/swtpm.log); swtpm 0.7 refuses --log fd=2


def _cpu_and_memory(spec: VirtualMachineSpec) -> list[str]:
    cpu, memory = spec.cpu, spec.memory
    # vCPUs are hot-plugged as cores: the topology QEMU sees is sized for maxCpus.
    max_cores = cpu.max_count // (cpu.sockets * cpu.threads)
    smp = _kv(str(cpu.count), sockets=cpu.sockets, cores=max_cores, threads=cpu.threads, maxcpus=cpu.max_count)
    mem = {"size": f"{memory.size // 1024**2}M"}
    if memory.maxSize is not None and memory.maxSize > memory.size:
        mem.update(slots=str(memory.slots), maxmem=f"{memory.maxSize // 1024**2}M")
    return ["-smp", smp, "-m", _kv("", **mem)]


def hugepage_backend(backend_id: str, size: int, mem_path: str) -> dict[str, Any]:
    """A ``memory-backend-file`` on hugetlbfs, preallocated (at start, or when a DIMM is added live): the
    pages are taken up front, so too few makes QEMU fail there and then, never a guest fault later."""
    return {"qom-type": "memory-backend-file", "id": _safe(backend_id), "size": size, "mem-path": _safe(mem_path),
            "prealloc": True, "share": False}


def _memory_backend(spec: VirtualMachineSpec, opened: OpenedFiles) -> list[str]:
    """The base memory's backend (``-machine memory-backend=``), when hugepages back it."""
    if not spec.memory.hugepages:
        return []
    if opened.hugepages is None:
        raise UnsafeOptionValue("memory.hugepages needs the hugetlbfs directory prepared for QEMU")
    return ["-object", _json(hugepage_backend(MEMORY_BACKEND, spec.memory.size, opened.hugepages))]


def _port(pcie: bool, device_id: str, chassis: int) -> list[str]:
    if not pcie:
        return []
    return ["-device", _json({"driver": "pcie-root-port", "id": root_port(device_id), "chassis": chassis,
                              "bus": "pcie.0"})]


def host_forwards(nic: NetworkInterfaceSpec) -> list[str]:
    return [f"{fwd.protocol}:{fwd.hostAddress}:{fwd.host}-:{fwd.guest}" for fwd in nic.portForwards]


# A disk's cache mode as QEMU's -drive cache= expands it: (cache.direct, cache.no-flush, device write-cache).
CACHE_MODES: dict[str, tuple[bool, bool, bool]] = {
    "writeback": (False, False, True), "none": (True, False, True), "writethrough": (False, False, False),
    "directsync": (True, False, False), "unsafe": (False, True, True),
}


def _node_options(disk: DiskSpec | None) -> dict[str, Any]:
    """cache, discard and read-only of a disk's block nodes (nothing for the defaults)."""
    if disk is None:
        return {}
    options: dict[str, Any] = {}
    direct, no_flush, _ = CACHE_MODES[disk.cache]
    if direct or no_flush:
        options["cache"] = {"direct": direct, "no-flush": no_flush}
    if disk.discard == "unmap":
        options["discard"] = "unmap"
    if disk.readOnly:
        options["read-only"] = True
    return options


def disk_file_blockdev(disk_name: str, path: str, disk: DiskSpec | None = None) -> dict[str, Any]:
    return {"driver": "file", "node-name": disk_file_node(disk_name), "filename": path, **_node_options(disk)}


def disk_format_blockdev(disk_name: str, backing: str | None = None, disk: DiskSpec | None = None) -> dict[str, Any]:
    """A disk's qcow2 node; ``backing``: the node of its backing image (else QEMU opens the path in the
    image's header itself)."""
    node = {"driver": "qcow2", "node-name": disk_node(disk_name), "file": disk_file_node(disk_name)}
    if backing:
        node["backing"] = backing
    return {**node, **_node_options(disk)}


def backing_blockdevs(disk_name: str, filename: str, image_format: str) -> list[dict[str, Any]]:
    """A linked clone's backing image as explicit read-only nodes (file, then format)."""
    return [
        {"driver": "file", "node-name": backing_file_node(disk_name), "filename": filename, "read-only": True},
        {"driver": image_format, "node-name": backing_node(disk_name), "file": backing_file_node(disk_name),
         "read-only": True},
    ]


_DISK_DRIVERS = {"virtio": "virtio-blk-pci", "scsi": "scsi-hd", "sata": "ide-hd"}


def disk_device_args(disk_name: str, bus: str | None, disk: DiskSpec | None = None,
                     ahci_port: int = 0) -> dict[str, Any]:
    """A disk's device: virtio-blk on ``bus`` (a root port, or none), scsi-hd on the virtio-scsi controller,
    or ide-hd on q35's AHCI port ``ahci_port``."""
    kind = disk.bus if disk is not None else "virtio"
    args: dict[str, Any] = {"driver": _DISK_DRIVERS[kind], "id": disk_node(disk_name), "drive": disk_node(disk_name),
                            "serial": disk_name}
    if kind == "scsi":
        bus = f"{SCSI_CONTROLLER}.0"
    elif kind == "sata":
        bus = f"ide.{ahci_port}"
    if bus:
        args["bus"] = bus
    if disk is not None and not CACHE_MODES[disk.cache][2]:
        args["write-cache"] = "off"
    return args


def nic_device_args(vm_name: str, nic: NetworkInterfaceSpec, bus: str | None) -> dict[str, Any]:
    driver = "virtio-net-pci" if nic.model == "virtio" else nic.model
    args: dict[str, Any] = {"driver": driver, "id": nic_device(nic.name), "netdev": nic_netdev(nic.name),
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
