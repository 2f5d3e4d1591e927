"""Frozen pydantic models of the manifest kinds (apiVersion ``infinization.io/v1alpha1``).

The loader (``spec.loader``) builds these from YAML; the planner compares them; the argv builder turns
them into QEMU options. Every string that can reach a QEMU option is validated here, once, so that no
``,``, ``=`` or control character can inject an option, and every path is absolute and normalised.
Defaults live here and nowhere else, so a default never shows up as drift.
"""

from __future__ import annotations

import hashlib
import ipaddress
import posixpath
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import pydantic
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializationInfo,
    field_serializer,
    model_validator,
)

from reconciler.spec import limits
from reconciler.spec.hostdev import HostDeviceSpec, unique_host_devices
from reconciler.spec.placement import CpuPlacement
from reconciler.spec.units import Size

API_VERSION = "infinization.io/v1alpha1"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=False, validate_default=True,
                              allow_inf_nan=False)


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (newline, tab, NUL...)")
    return value


def _option_safe(value: str) -> str:
    """A value that is placed inside a QEMU ``key=value,...`` option: no ',' or '=' or control chars."""
    _no_control(value)
    if "," in value or "=" in value:
        raise ValueError("must not contain ',' or '=' (they would inject QEMU options)")
    return value


def _absolute_path(value: str) -> str:
    _option_safe(value)
    if not value.startswith("/"):
        raise ValueError("must be an absolute path")
    if ".." in value.split("/"):
        raise ValueError("must not contain '..'")
    return posixpath.normpath(value)


def _mac(value: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", value):
        raise ValueError("must be a MAC address like 52:54:00:12:34:56")
    if int(value[:2], 16) & 1:
        raise ValueError("must be a unicast MAC address (the first octet must be even)")
    return value.lower()


def _accel_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


AbsolutePath = Annotated[str, AfterValidator(_absolute_path)]
MacAddress = Annotated[str, AfterValidator(_mac)]
ResourceName = Annotated[
    str,
    Field(min_length=1, max_length=40, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"),
]
"""A VM name: lowercase letters, digits and '-', at most 40 characters, not starting or ending with '-'."""
DeviceName = Annotated[str, Field(min_length=1, max_length=24, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")]
"""A disk or NIC name inside one VM; it becomes part of QEMU ids and file names."""
Accel = Literal["kvm", "tcg"]


class ObjectMeta(_Frozen):
    name: ResourceName
    labels: dict[Annotated[str, Field(max_length=63)], Annotated[str, AfterValidator(_no_control)]] = Field(
        default_factory=dict
    )


def _default_accels() -> list[Accel]:
    return ["kvm", "tcg"]


class MachineSpec(_Frozen):
    type: Literal["q35", "pc"] = "q35"
    accel: Annotated[list[Accel], BeforeValidator(_accel_list, json_schema_input_type=Accel | list[Accel]),
                     Field(min_length=1)] = Field(
        default_factory=_default_accels,
        description="An accelerator or a list tried in order (QEMU falls back to the next one).",
    )

    @model_validator(mode="after")
    def _unique_accels(self) -> MachineSpec:
        if len(set(self.accel)) != len(self.accel):
            raise ValueError("accel lists an accelerator twice")
        return self


class CpuSpec(_Frozen):
    sockets: Annotated[int, Field(ge=1, le=16)] = 1
    cores: Annotated[int, Field(ge=1, le=128)] = 1
    threads: Annotated[int, Field(ge=1, le=2)] = 1
    model: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)] | None = None
    maxCpus: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        default=None,
        description="Most vCPUs the VM may have; cores can be added live up to it. Default: no hot-plug.",
    )
    placement: CpuPlacement | None = Field(
        default=None, description="Pin QEMU's threads to host CPUs (applied and repaired live). Default: unpinned."
    )

    @property
    def count(self) -> int:
        return self.sockets * self.cores * self.threads

    @property
    def max_count(self) -> int:
        return self.maxCpus if self.maxCpus is not None else self.count

    @model_validator(mode="after")
    def _max_fits_topology(self) -> CpuSpec:
        if self.maxCpus is not None:
            if self.maxCpus < self.count:
                raise ValueError(f"maxCpus ({self.maxCpus}) is below sockets*cores*threads ({self.count})")
            if self.maxCpus % (self.sockets * self.threads):
                raise ValueError("maxCpus must be a multiple of sockets*threads (vCPUs are added as cores)")
        pins = self.placement.vcpuPins if self.placement else {}
        if beyond := sorted(vcpu for vcpu in pins if vcpu >= self.max_count):
            raise ValueError(f"placement.vcpuPins: vCPU {beyond[0]} does not exist (the VM has at most "
                             f"{self.max_count} vCPUs)")
        problem = limits.cpu_problem(self.sockets, self.max_count // (self.sockets * self.threads), self.threads)
        if problem:
            raise ValueError(problem)
        return self


class MemorySpec(_Frozen):
    size: Size = 512 * 1024**2
    maxSize: Size | None = Field(
        default=None, description="Memory can grow live (DIMM hot-plug) up to this. Default: no hot-plug."
    )
    balloon: bool = Field(default=False, description="A virtio balloon, so memory can also shrink live.")
    slots: Annotated[int, Field(ge=1, le=32)] = Field(default=8, description="DIMM slots (with maxSize).")
    hugepages: bool = Field(default=False, description="Back the guest's memory (and DIMMs added live) with the "
                            "host's hugepages (hugetlbfs, preallocated); too few free is refused at plan time.")
    hugepageSize: Literal["2Mi", "1Gi"] = Field(default="2Mi", description="The hugepage size (with hugepages).")

    @model_validator(mode="after")
    def _whole_mebibytes(self) -> MemorySpec:
        for label, value in (("size", self.size), ("maxSize", self.maxSize)):
            if value is not None and (value % 1024**2 or value < 16 * 1024**2):
                raise ValueError(f"memory {label} must be a whole number of MiB, at least 16Mi")
        if self.maxSize is not None and self.maxSize < self.size:
            raise ValueError("memory maxSize is below size")
        if self.hugepages:
            for label, value in (("size", self.size), ("maxSize", self.maxSize)):
                if value is not None and value % self.hugepage_bytes:
                    raise ValueError(f"memory {label} must be a multiple of hugepageSize ({self.hugepageSize})")
        problem = limits.memory_problem(self.size, self.maxSize, self.slots)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def hugepage_bytes(self) -> int:
        return 1024**3 if self.hugepageSize == "1Gi" else 2 * 1024**2


class BootSpec(_Frozen):
    kernel: AbsolutePath
    initrd: AbsolutePath | None = None
    cmdline: Annotated[str, AfterValidator(_no_control), Field(max_length=4096)] = ""


class FirmwareSpec(_Frozen):
    type: Literal["bios", "uefi"] = Field(default="bios", description="bios: SeaBIOS; uefi: OVMF from the host.")
    secureBoot: bool = Field(default=False, description="uefi: Secure Boot on, with Microsoft's keys enrolled.")

    @model_validator(mode="after")
    def _secure_boot_needs_uefi(self) -> FirmwareSpec:
        if self.secureBoot and self.type != "uefi":
            raise ValueError("secureBoot needs type: uefi")
        return self


BootDevice = Annotated[str, Field(pattern=r"^(cdrom|disk):[a-z0-9]([a-z0-9-]*[a-z0-9])?$")]
"""A boot device: ``disk:NAME`` or ``cdrom:NAME`` (a disk or CD-ROM of the same VM)."""


class DiskSpec(_Frozen):
    name: DeviceName
    size: Size | None = Field(default=None, description="Virtual size; grows in place, never shrinks.")
    image: AbsolutePath | None = Field(
        default=None, description="A backing image: the disk is a copy-on-write linked clone of it."
    )
    imageFormat: Literal["qcow2", "raw"] = "qcow2"
    deletePolicy: Literal["Retain", "Delete"] = Field(
        default="Retain", description="What happens to the disk file when its VM is deleted."
    )
    iops: Annotated[int, Field(ge=0, le=limits.THROTTLE_VALUE_MAX)] = Field(
        default=0, description="I/O operations per second limit; 0: none (QEMU's maximum: 1e15).")
    bps: Annotated[Size, Field(le=limits.THROTTLE_VALUE_MAX)] = Field(
        default=0, description="Bytes per second limit; 0: none (QEMU's maximum: 1e15).")
    bus: Literal["virtio", "scsi", "sata"] = Field(
        default="virtio", description="virtio-blk; scsi: on the virtio-scsi controller; sata: q35's AHCI "
        "(for installers without virtio drivers; no hot-plug).")
    cache: Literal["none", "writeback", "writethrough", "directsync", "unsafe"] = Field(
        default="writeback", description="Host cache mode, as QEMU's -drive cache= (none: O_DIRECT).")
    discard: Literal["ignore", "unmap"] = Field(
        default="ignore", description="unmap: the guest's TRIM/discard frees space in the image.")
    readOnly: bool = Field(default=False, description="The guest cannot write to it (not with bus sata).")
    preallocation: Literal["off", "metadata", "falloc", "full"] = Field(
        default="off", description="qcow2 preallocation when the disk file is created (qemu-img create -o).")

    @model_validator(mode="after")
    def _size_or_image(self) -> DiskSpec:
        if self.size is None and self.image is None:
            raise ValueError("a disk needs a size, an image, or both")
        if self.preallocation != "off" and self.image is not None:
            raise ValueError("preallocation needs a disk without image (qcow2 refuses it on a linked clone)")
        if self.readOnly and self.bus == "sata":
            raise ValueError("readOnly needs bus virtio or scsi (QEMU's ide-hd refuses a read-only drive)")
        if self.size is not None and (self.size % 512 or self.size == 0):
            raise ValueError("disk size must be a positive multiple of 512 bytes")
        if self.size is not None and self.size > limits.QCOW2_MAX_SIZE:
            raise ValueError("disk size is over 2Pi, the most a qcow2 image (64 KiB clusters) can hold")
        return self


class PortForward(_Frozen):
    host: Annotated[int, Field(ge=1, le=65535)]
    guest: Annotated[int, Field(ge=1, le=65535)]
    protocol: Literal["tcp", "udp"] = "tcp"
    hostAddress: Annotated[
        str, Field(pattern=r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$", description="Host address to bind.")
    ] = "127.0.0.1"


def _no_zone(value: str) -> None:
    # Python keeps an IPv6 zone ("fe80::1%eth0") verbatim, whatever it holds (newlines, braces): it would
    # reach the nft script as is. A rule or an address here has no use for one.
    if "%" in value:
        raise ValueError(f"{value!r}: scoped addresses (with a %zone) are not accepted")


def _cidr(value: str) -> str:
    _no_zone(value)
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address or CIDR") from exc


def _interface_address(value: str) -> str:
    _no_zone(value)
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an address with a prefix, like 10.77.0.1/24") from exc
    if iface.version != 4 or iface.network.prefixlen > 30:
        raise ValueError("the bridge address must be IPv4 with a prefix of /30 or shorter")
    return str(iface)


def _ip(value: str) -> str:
    _no_zone(value)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address") from exc


def _ports(value: str) -> str:
    parts = []
    for item in value.replace(" ", "").split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"{value!r}: expected ports like '22,80-90'")
        a, b = int(low), int(high or low)
        if not 1 <= a <= b <= 65535:
            raise ValueError(f"{value!r}: ports must be 1-65535, ranges low-high")
        parts.append(f"{a}-{b}" if b != a else str(a))
    return ",".join(parts)


Cidr = Annotated[str, AfterValidator(_cidr)]
IpAddress = Annotated[str, AfterValidator(_ip)]
InterfaceName = Annotated[str, Field(min_length=1, max_length=15, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
"""A Linux interface name: at most 15 characters."""


class FirewallRule(_Frozen):
    direction: Literal["in", "out", "both"] = Field(description="in: to the guest; out: from the guest.")
    action: Literal["accept", "drop", "reject"]
    protocol: Literal["tcp", "udp", "icmp", "icmpv6", "any"] = "any"
    ports: Annotated[str, AfterValidator(_ports)] | None = Field(
        default=None, description="Destination ports for tcp/udp: '22,80-90'."
    )
    source: Cidr | None = None
    destination: Cidr | None = None
    state: list[Literal["new", "established", "related", "invalid"]] = Field(default_factory=list)
    priority: Annotated[int, Field(ge=0, le=1000)] = Field(default=500, description="Lower runs first.")

    @model_validator(mode="after")
    def _ports_need_a_port_protocol(self) -> FirewallRule:
        if self.ports and self.protocol not in ("tcp", "udp"):
            raise ValueError("ports need protocol tcp or udp")
        for cidr in (self.source, self.destination):
            if cidr is not None:
                version = ipaddress.ip_network(cidr).version
                if (self.protocol == "icmp" and version == 6) or (self.protocol == "icmpv6" and version == 4):
                    raise ValueError(f"protocol {self.protocol} does not match the address family of {cidr}")
        if self.source and self.destination and \
                ipaddress.ip_network(self.source).version != ipaddress.ip_network(self.destination).version:
            raise ValueError("source and destination must be of the same address family")
        return self


class FirewallSpec(_Frozen):
    default: Literal["accept", "drop"] = "accept"
    rules: list[FirewallRule] = Field(default_factory=list)
    antiSpoofing: bool = Field(
        default=True, description="The guest may only send from its own MAC (and its declared ips)."
    )


class NetworkInterfaceSpec(_Frozen):
    name: DeviceName
    type: Literal["user", "bridge"] = "user"
    network: ResourceName | None = Field(default=None, description="type bridge: a Network by name.")
    bridge: InterfaceName | None = Field(default=None, description="type bridge: an existing host bridge.")
    mac: MacAddress | None = Field(
        default=None, description="Defaults to 5a and 40 bits of a hash of the VM and NIC names; once assigned "
        "it is recorded and kept (spec.macs)."
    )
    ips: list[IpAddress] = Field(default_factory=list, description="The guest's addresses, for anti-spoofing.")
    portForwards: list[PortForward] = Field(default_factory=list)
    link: Literal["up", "down"] = Field(default="up", description="Link state, as the guest sees it.")
    queues: Annotated[int, Field(ge=1, le=16)] = Field(default=1, description="Multiqueue (type bridge).")
    model: Literal["virtio", "e1000e"] = Field(
        default="virtio", description="e1000e: an emulated Intel NIC, for installers without virtio drivers.")
    firewall: FirewallSpec | None = Field(default=None, description="type bridge: per-NIC nftables rules.")
    ipv6: bool = Field(
        default=False, description="type bridge with ips: the guest may send IPv6 without a declared IPv6 address."
    )
    restrict: bool = Field(
        default=False, description="type user: the guest reaches nothing outside (QEMU restrict=on); "
        "portForwards still work."
    )

    @model_validator(mode="after")
    def _backend_fields(self) -> NetworkInterfaceSpec:
        if self.type == "user":
            for field_name in ("network", "bridge", "firewall"):
                if getattr(self, field_name) is not None:
                    raise ValueError(f"{field_name} needs type: bridge")
            if self.queues != 1:
                raise ValueError("queues needs type: bridge")
            if self.ipv6:
                raise ValueError("ipv6 needs type: bridge")
        else:
            if self.restrict:
                raise ValueError("restrict is for type: user")
            if (self.network is None) == (self.bridge is None):
                raise ValueError("type bridge needs exactly one of network (a Network) or bridge (a host bridge)")
            if self.portForwards:
                raise ValueError("portForwards are for type: user")
        if self.queues != 1 and self.model != "virtio":
            raise ValueError("queues needs model: virtio")
        return self


class CdromSpec(_Frozen):
    name: DeviceName
    image: AbsolutePath | None = Field(default=None, description="An ISO image; none: an empty drive.")
    bootOnce: bool = Field(default=False, description="Boot from this CD until the install from it ends (the "
                           "guest's first power-off or reboot after a start from it).")
    ejectAfterInstall: bool = Field(default=False, description="Eject the medium when the install from it ends.")


CIDATA = "cidata"
"""The CD-ROM that carries the cloud-init NoCloud seed (a name no ``cdroms`` entry may take)."""
REDACTED = "<redacted sha256:"


def secret_digest(value: str) -> str:
    """sha256 of a secret, or the digest a redacted one carries (plans on disk hold only that)."""
    if value.startswith(REDACTED) and value.endswith(">"):
        return value[len(REDACTED):-1]
    return hashlib.sha256(value.encode()).hexdigest()


class CloudInitSpec(_Frozen):
    """A NoCloud seed. ``userData`` may hold passwords: it is serialized as its hash unless the state files
    write it (context ``secrets``), and two specs are equal when their user-data hashes are."""

    userData: Annotated[str, Field(max_length=1024 * 1024)] = Field(description="Written byte-identical as user-data.")
    networkConfig: dict[str, Any] | None = Field(default=None, description="network-config (version 2).")

    @field_serializer("userData")
    def _hide(self, value: str, info: SerializationInfo) -> str:
        return value if (info.context or {}).get("secrets") else f"{REDACTED}{secret_digest(value)}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CloudInitSpec):
            return NotImplemented
        return (secret_digest(self.userData), self.networkConfig) == (secret_digest(other.userData),
                                                                      other.networkConfig)

    def __hash__(self) -> int:
        return hash(secret_digest(self.userData))


class RngSpec(_Frozen):
    enabled: bool = Field(default=True, description="A virtio RNG fed from the host's /dev/urandom.")


AGENT_PORT = "org.qemu.guest_agent.0"
"""The virtio-serial port name qemu-guest-agent opens in the guest (reserved: no channel may take it)."""
ChannelName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
"""A virtio-serial port name: letters, digits, '.', '_' and '-' (no ',' '=' or anything QEMU would parse)."""


class ChannelSpec(_Frozen):
    name: ChannelName = Field(description="The port's name in the guest (/dev/virtio-ports/NAME), e.g. "
                              "com.infinibay.service; the host side is a unix socket in vms/NAME/run/.")


class GuestAgentSpec(_Frozen):
    enabled: bool = Field(default=False, description="A virtio-serial port org.qemu.guest_agent.0 on "
                          "vms/NAME/run/qga.sock: status shows the guest's IPs and OS, a stop asks it first.")


class TpmSpec(_Frozen):
    enabled: bool = Field(default=False, description="A TPM 2.0 (tpm-crb), emulated by swtpm; its state is kept.")


def _listen(value: str) -> str:
    address = _ip(value)
    if ipaddress.ip_address(address).is_multicast:
        raise ValueError(f"{value!r} is a multicast address")
    return address


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


class SpiceOptions(_Frozen):
    agent: bool = Field(default=True, description="The SPICE agent channel (vdagent: copy and paste, resize, "
                        "client mouse mode).")
    imageCompression: Literal["auto_glz", "auto_lz", "quic", "glz", "lz", "off"] = Field(
        default="auto_glz", description="SPICE image compression (-spice image-compression=).")
    streamingVideo: Literal["off", "all", "filter"] = Field(
        default="filter", description="Video stream detection (-spice streaming-video=).")


VNC_BASE_PORT = 5900
"""QEMU's -vnc takes a display number: the port is 5900 + it, so a VNC port is never below 5900."""


class DisplaySpec(_Frozen):
    """A remote display: VNC or SPICE on ``listen``:``port``; its password (``passwordFile``) is read by the
    reconciler and set over QMP, never given to QEMU's command line, plans, logs or status."""

    type: Literal["none", "vnc", "spice"] = Field(default="none", description="none: no display device.")
    listen: Annotated[str, AfterValidator(_listen)] = Field(
        default="127.0.0.1", description="The host address the display listens on (beyond loopback: a "
        "passwordFile is required).")
    port: Literal["auto"] | Annotated[int, Field(ge=VNC_BASE_PORT, le=65535)] = Field(
        default="auto", description="auto: a port from the host's displayPortRange, kept for the VM; or a number.")
    passwordFile: AbsolutePath | None = Field(
        default=None, description="A file under the host's secretDirs (root's, not group/world-readable) whose "
        "first line is the password (VNC: at most 8 characters).")
    passwordExpiresAfter: Annotated[int, Field(ge=1, le=10 * 365 * 86400)] | None = Field(
        default=None, description="Seconds after it is set that the password stops working (expire_password); "
        "none: never.")
    spice: SpiceOptions | None = Field(default=None, description="type spice: SPICE options.")

    @model_validator(mode="after")
    def _consistent(self) -> DisplaySpec:
        if self.type == "none":
            if self.passwordFile is not None or self.spice is not None or self.port != "auto" \
                    or self.passwordExpiresAfter is not None:
                raise ValueError("port, passwordFile, passwordExpiresAfter and spice need type vnc or spice")
            return self
        if self.spice is not None and self.type != "spice":
            raise ValueError("spice options need type: spice")
        if not is_loopback(self.listen) and self.passwordFile is None:
            raise ValueError(f"listen {self.listen} is beyond loopback: a passwordFile is required "
                             "(a display open to the network without a password is refused)")
        if self.passwordExpiresAfter is not None and self.passwordFile is None:
            raise ValueError("passwordExpiresAfter needs a passwordFile")
        return self

    @property
    def enabled(self) -> bool:
        return self.type != "none"

    @property
    def spice_options(self) -> SpiceOptions:
        return self.spice or SpiceOptions()


class InputSpec(_Frozen):
    tablet: bool | None = Field(default=None, description="A USB tablet (absolute pointer); default: on with a "
                                "display.")


class AudioSpec(_Frozen):
    enabled: bool = Field(default=False, description="An ich9 HD Audio controller whose sound goes through the "
                          "display (SPICE's playback channel, VNC's audio extension).")


class VirtualMachineSpec(_Frozen):
    runStrategy: Literal["Always", "RerunOnFailure", "Manual", "Halted"] = Field(
        default="Always",
        description="Always: keep it running. RerunOnFailure: restart after a crash, not after a clean guest "
        "shutdown. Manual: never started or stopped by the reconciler. Halted: keep it stopped.",
    )
    paused: bool = Field(
        default=False, strict=True,
        description="Keep the VM's QEMU running but its vCPUs stopped (QMP stop/cont): no guest CPU time, memory "
        "kept, the same boot resumes where it left off. A VM started paused is started with -S (its guest has "
        "not run yet). Changed live; a VM QEMU itself paused (a disk error, a panic) is reported, never resumed.",
    )
    host: ResourceName | None = Field(
        default=None, description="The host that runs this VM (`sync --host NAME`); none: hosts without a name."
    )
    restartPolicy: Literal["Manual", "Auto"] = Field(
        default="Manual",
        description="Manual: changes that need a restart wait for `apply --allow-restart`. Auto: restart.",
    )
    machine: MachineSpec = Field(default_factory=MachineSpec)
    cpu: CpuSpec = Field(default_factory=CpuSpec)
    memory: MemorySpec = Field(default_factory=MemorySpec)
    boot: BootSpec | None = None
    firmware: FirmwareSpec = Field(default_factory=FirmwareSpec)
    disks: list[DiskSpec] = Field(default_factory=list)
    networks: list[NetworkInterfaceSpec] = Field(default_factory=list)
    cdroms: list[CdromSpec] = Field(default_factory=list)
    tpm: TpmSpec = Field(default_factory=TpmSpec)
    bootOrder: list[BootDevice] = Field(
        default_factory=list, description="Devices to boot from, in order: disk:NAME, cdrom:NAME. Default: the disks."
    )
    hotplugSlots: Annotated[int, Field(ge=0, le=16)] = Field(
        default=4, description="Spare PCIe slots reserved at start for disks and NICs added live."
    )
    terminationGracePeriodSeconds: Annotated[int, Field(ge=0, le=3600)] = Field(
        default=60, description="How long a graceful stop (ACPI power button) may take before QEMU is quit."
    )
    rng: RngSpec = Field(default_factory=RngSpec)
    guestAgent: GuestAgentSpec = Field(default_factory=GuestAgentSpec)
    channels: list[ChannelSpec] = Field(default_factory=list, description="Named virtio-serial ports, each a "
                                        "unix socket (server) in vms/NAME/run/ for the host platform.")

    @pydantic.field_validator("firmware")
    @classmethod
    def _secure_boot_needs_q35(cls, value: FirmwareSpec, info: pydantic.ValidationInfo) -> FirmwareSpec:
        machine = info.data.get("machine")
        if value.secureBoot and machine is not None and machine.type != "q35":
            raise ValueError("secureBoot needs machine type q35 (OVMF's Secure Boot build needs SMM)")
        return value

    @pydantic.field_validator("bootOrder")
    @classmethod
    def _boot_devices_exist(cls, value: list[str], info: pydantic.ValidationInfo) -> list[str]:
        names = {"disk": {disk.name for disk in info.data.get("disks", [])},
                 "cdrom": {cdrom.name for cdrom in info.data.get("cdroms", [])}}
        for index, entry in enumerate(value):
            kind, _, name = entry.partition(":")
            if name not in names[kind]:
                raise ValueError(f"bootOrder[{index}]: {entry}: this VM has no {kind} named {name!r}")
        if len(set(value)) != len(value):
            raise ValueError("bootOrder names a device twice")
        return value
    cloudInit: CloudInitSpec | None = Field(default=None, description="A NoCloud seed CD (label cidata).")
    display: DisplaySpec = Field(default_factory=DisplaySpec)
    input: InputSpec = Field(default_factory=InputSpec)
    audio: AudioSpec = Field(default_factory=AudioSpec)

    @model_validator(mode="after")
    def _audio_needs_display(self) -> VirtualMachineSpec:
        if self.audio.enabled and not self.display.enabled:
            raise ValueError("audio.enabled needs a display (display.type vnc or spice): the sound goes through it")
        return self

    @property
    def tablet(self) -> bool:
        """The USB tablet: as ``input.tablet`` says, else on exactly when there is a display."""
        return self.input.tablet if self.input.tablet is not None else self.display.enabled
    hostDevices: list[HostDeviceSpec] = Field(default_factory=list, description="Host PCI and USB devices passed "
                                              "through (PCI: vfio-pci, its IOMMU group bound while the VM has it).")

    @model_validator(mode="after")
    def _host_devices(self) -> VirtualMachineSpec:
        unique_host_devices(self.hostDevices)
        if any(device.pci for device in self.hostDevices) and self.machine.type != "q35":
            raise ValueError("PCI hostDevices need machine type q35 (each sits on its own PCIe root port)")
        return self

    @model_validator(mode="after")
    def _unique_device_names(self) -> VirtualMachineSpec:
        for kind, items in (("disks", self.disks), ("networks", self.networks), ("cdroms", self.cdroms)):
            seen: set[str] = set()
            for item in items:
                if item.name in seen:
                    raise ValueError(f"{kind}: the name {item.name!r} is used twice")
                seen.add(item.name)
        return self

    @model_validator(mode="after")
    def _channel_names(self) -> VirtualMachineSpec:
        seen: set[str] = set()
        for channel in self.channels:
            if channel.name == AGENT_PORT:
                raise ValueError(f"channels: {AGENT_PORT!r} is reserved for the guest agent (guestAgent.enabled)")
            if channel.name in seen:
                raise ValueError(f"channels: the name {channel.name!r} is used twice")
            seen.add(channel.name)
        return self

    @model_validator(mode="after")
    def _devices_fit(self) -> VirtualMachineSpec:
        """Every device has a slot: QEMU would refuse the start (and an apply would stop half-way, after
        creating the disks) when the root bus or the SCSI controller runs out."""
        virtio = sum(disk.bus == "virtio" for disk in self.disks)
        used = limits.pci_slots_used(virtio, len(self.networks), self.hotplugSlots, balloon=self.memory.balloon,
                                     rng=self.rng.enabled, serial=self.guestAgent.enabled or bool(self.channels))
        if used > limits.PCI_SLOTS:
            raise ValueError(f"the devices need {used} PCI slots ({virtio} virtio disk(s), {len(self.networks)} "
                             f"NIC(s), {self.hotplugSlots} hotplugSlots, and controllers); the {self.machine.type} "
                             f"machine has {limits.PCI_SLOTS} (use bus scsi for more disks)")
        scsi = sum(disk.bus == "scsi" for disk in self.disks) + len(self.cdroms)
        if scsi > limits.SCSI_TARGETS:
            raise ValueError(f"{scsi} scsi disks and CD-ROMs: the virtio-scsi controller has {limits.SCSI_TARGETS} "
                             "targets")
        return self

    @model_validator(mode="after")
    def _sata_fits(self) -> VirtualMachineSpec:
        sata = [disk.name for disk in self.disks if disk.bus == "sata"]
        if sata and self.machine.type != "q35":
            raise ValueError("disks with bus sata need machine type q35 (its built-in AHCI controller)")
        if len(sata) > SATA_PORTS:
            raise ValueError(f"at most {SATA_PORTS} disks with bus sata (the AHCI controller's ports)")
        return self


class VirtualMachine(_Frozen):
    apiVersion: Literal["infinization.io/v1alpha1"]
    kind: Literal["VirtualMachine"]
    metadata: ObjectMeta
    spec: VirtualMachineSpec

    @property
    def name(self) -> str:
        return self.metadata.name


class DhcpSpec(_Frozen):
    rangeStart: IpAddress
    rangeEnd: IpAddress
    leaseTime: Annotated[int, Field(ge=120, le=86400 * 7)] = 3600


class NetworkSpec(_Frozen):
    bridge: InterfaceName
    address: Annotated[str, AfterValidator(_interface_address)] | None = Field(
        default=None, description="The host's address on the bridge, with its prefix: 10.77.0.1/24."
    )
    nat: bool = Field(default=False, description="Masquerade the subnet to the host's uplinks.")
    isolated: bool = Field(default=False, description="No forwarding in or out: guests see only each other.")
    ipv6: bool = Field(
        default=False, description="Keep the kernel's IPv6 autoconfiguration on the bridge (accept_ra, autoconf); "
        "without it both are 0, so a guest's router advertisement cannot configure the host."
    )
    dhcp: DhcpSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> NetworkSpec:
        if self.nat and self.address is None:
            raise ValueError("nat needs an address (the subnet to masquerade)")
        if self.nat and self.isolated:
            raise ValueError("a network cannot be both nat and isolated")
        if self.dhcp is not None:
            if self.address is None:
                raise ValueError("dhcp needs an address")
            subnet = ipaddress.ip_interface(self.address).network
            for bound in (self.dhcp.rangeStart, self.dhcp.rangeEnd):
                if ipaddress.ip_address(bound) not in subnet:
                    raise ValueError(f"dhcp range bound {bound} is outside {subnet}")
        return self


class Network(_Frozen):
    apiVersion: Literal["infinization.io/v1alpha1"]
    kind: Literal["Network"]
    metadata: ObjectMeta
    spec: NetworkSpec

    @property
    def name(self) -> str:
        return self.metadata.name


SATA_PORTS = 6


def sata_port(spec: VirtualMachineSpec, disk_name: str) -> int:
    """The AHCI port (``ide.N``) of a sata disk: its position among the VM's sata disks."""
    return [disk.name for disk in spec.disks if disk.bus == "sata"].index(disk_name)


def cpu_model(spec: VirtualMachineSpec) -> str | None:
    """The CPU model QEMU is given: ``cpu.model``, else ``host`` when the accelerator can only be KVM
    (``accel: [kvm]``), else None (QEMU's default). With a fallback (``[kvm, tcg]``, the default) QEMU may
    end up on TCG, where ``-cpu host`` does not start: the default stays QEMU's; say ``model: host``."""
    if spec.cpu.model is not None:
        return spec.cpu.model
    return "host" if spec.machine.accel == ["kvm"] else None


MAC_PREFIX = 0x5A  # locally administered, unicast, and not QEMU's 52:54:00 (see spec.macs)


def default_mac(vm_name: str, nic_name: str, attempt: int = 0) -> str:
    """The ``attempt``-th address derived from the VM and NIC names: ``5a`` and 40 bits of a hash (the
    planner's callers resolve collisions and keep assigned addresses: ``spec.macs.resolve``)."""
    text = f"{vm_name}/{nic_name}" + (f"#{attempt}" if attempt else "")
    digest = hashlib.sha256(text.encode()).digest()
    return ":".join(f"{byte:02x}" for byte in (MAC_PREFIX, *digest[:5]))


def nic_mac(vm_name: str, nic: NetworkInterfaceSpec) -> str:
    """The NIC's address: its own, or (for a spec ``spec.macs.resolve`` has not seen) the first derived one."""
    return nic.mac if nic.mac is not None else default_mac(vm_name, nic.name)


def tap_name(vm_name: str, nic_name: str) -> str:
    """A deterministic TAP name within Linux's 15 characters: 'inz' + 12 hex digits of a hash."""
    return "inz" + hashlib.sha256(f"{vm_name}/{nic_name}".encode()).hexdigest()[:12]


def nic_bridge(nic: NetworkInterfaceSpec, networks: Mapping[str, Network]) -> str | None:
    """The host bridge a bridged NIC joins: its own ``bridge``, or its Network's (None: unknown Network).

    ``networks`` is whichever set of Networks the caller trusts: the desired ones for the planner and the
    observers, the recorded (created) ones for the executor.
    """
    if nic.bridge:
        return nic.bridge
    if nic.network and nic.network in networks:
        return networks[nic.network].spec.bridge
    return None
