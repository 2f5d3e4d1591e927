"""What the planner knows about the host: frozen snapshots built by ``reconciler.observe``.

These are facts, not opinions: the observers fill them from /proc, QMP, ``qemu-img info -U`` and the
state directory, and the planner reads them. They serialise to JSON so a plan's inputs can be digested
(a saved plan is refused when they changed) and so a plan can be computed offline from a recording.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from reconciler.hostnet.nftables import HostCapabilities
from reconciler.plan.hostdev_facts import ObservedHostDevices
from reconciler.plan.hostfacts import ObservedCpuHost, ObservedPlacement
from reconciler.spec.models import VirtualMachineSpec
from reconciler.state.models import DhcpLease, NetworkRecord


class _Fact(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ObservedImage(_Fact):
    """One image file as ``qemu-img info -U`` reports it (or its absence)."""

    path: str
    exists: bool
    virtual_size: int | None = None
    format: str | None = None
    backing: str | None = None
    backing_format: str | None = None
    error: str | None = None


PathKind = Literal["file", "directory", "device", "missing", "other"]


class ObservedPath(_Fact):
    """A host path as found on disk: what it resolves to after symlinks, and what that is.

    Recorded for every path a manifest names, every storage root and the state directory, so the host
    policy (``plan.policy``) can be checked without I/O. ``kind`` is the resolved path's file type.
    """

    path: str
    resolved: str
    kind: PathKind


class LiveDisk(_Fact):
    device: bool = Field(description="The virtio-blk device is plugged.")
    node: bool = Field(description="The qcow2 block node exists.")
    iops: int = 0
    bps: int = 0
    driver: str = Field(default="", description="The device's QOM type (virtio-blk-pci, scsi-hd, ide-hd).")


class LiveNic(_Fact):
    device: bool
    netdev: bool
    mac: str | None = None
    link: str = "up"


class LiveCdrom(_Fact):
    image: str | None = None


class LiveDisplay(_Fact):
    """The display server a running QEMU has (query-vnc / query-spice)."""

    protocol: Literal["vnc", "spice"]
    host: str | None = None
    port: int | None = None
    auth: str | None = Field(default=None, description="vnc: none, vnc...; spice: none or spice (ticketing).")


class LiveState(_Fact):
    """What a running QEMU has right now, read over QMP (link state and balloon target from live.json)."""

    disks: dict[str, LiveDisk] = Field(default_factory=dict)
    nics: dict[str, LiveNic] = Field(default_factory=dict)
    cdroms: dict[str, LiveCdrom] = Field(default_factory=dict)
    cpus: int
    memory: int = Field(description="Base memory plus hot-plugged DIMMs, in bytes.")
    dimms: int = 0
    balloon_target: int | None = Field(default=None, description="Last balloon target we set; None: full.")
    free_slots: int = Field(description="Spare hot-plug slots with nothing plugged in.")
    pending_unplugs: list[str] = Field(default_factory=list, description="Device ids whose unplug is pending.")
    display: LiveDisplay | None = Field(default=None, description="The VNC or SPICE server, if enabled.")
    host_devices: list[str] = Field(default_factory=list, description="Names of the passed-through host devices "
                                    "plugged (device ids hostdev-NAME).")
    usb_controller: bool = Field(default=False, description="The xHCI controller for USB host devices exists.")
    vcpu_threads: dict[int, int] = Field(default_factory=dict, description="vCPU index -> its host thread id "
                                         "(query-cpus-fast).")


class ObservedAgent(_Fact):
    """What the guest agent answered (status only: never planned on, not part of the plan's digest)."""

    answering: bool
    addresses: list[str] = Field(default_factory=list, description="The guest's addresses (address/prefix), no lo.")
    os: str | None = Field(default=None, description="guest-get-osinfo's pretty name.")
    detail: str = Field(default="", description="Why it is not answering, or what limits its answer (frozen).")


class ObservedProcess(_Fact):
    """A live QEMU whose /proc cmdline proved it is ours for this VM."""

    pid: int
    start_time: int | None = Field(default=None, description="Its start time (/proc/PID/stat), as verified.")
    status: str = Field(description="QMP query-status: running, paused, shutdown...; 'unreachable' without QMP")
    launched: VirtualMachineSpec | None = Field(
        default=None, description="The spec the process was started with (launch.json, checked against argv)."
    )
    live: LiveState | None = Field(default=None, description="Devices, vCPUs and memory now; None: no QMP.")
    agent: ObservedAgent | None = Field(default=None, description="The guest agent, when asked (status) and "
                                        "the running QEMU has its port.")
    placement: ObservedPlacement | None = Field(default=None, description="Its threads' CPUs and cpuset cgroup.")
    recorded: bool = Field(default=True, description="launch.json names its pid; False: a start was interrupted "
                           "between the launch and its record, and the process was adopted on the rest.")


class ObservedSecret(_Fact):
    """A display's passwordFile as the observer found it: a keyed hash of its password (never the password),
    or why it cannot be used."""

    path: str
    digest: str | None = Field(default=None, description="HMAC of the VM, expiry and password under the host's "
                               "display.key ('' while there is no key yet); None with a problem.")
    length: int | None = Field(default=None, description="The password's length (VNC takes at most 8).")
    problem: str | None = None


class ObservedVM(_Fact):
    name: str
    process: ObservedProcess | None = None
    last_exit: str | None = Field(
        default=None, description="How the last QEMU of this VM ended (exit.json): guest-shutdown, crash..."
    )
    disks: dict[str, ObservedImage] = Field(default_factory=dict, description="Our disk files, by disk name.")
    efi_vars: str | None = Field(default=None, description="Its UEFI variable store's path, when it exists.")
    efi_vars_secure_boot: bool | None = Field(
        default=None, description="Whether that store was copied from a Secure Boot template (None: not known).")
    unverified: str | None = Field(
        default=None, description="A live process the pidfile names but that is not proven this VM's QEMU (why); "
        "it is not adopted: the VM counts as not running.")
    tpm_pid: int | None = Field(default=None, description="The VM's swtpm, when one of ours runs (verified).")
    tpm_state: bool = Field(default=False, description="The VM's TPM state directory (tpm/NAME/) exists.")
    display_password: str | None = Field(default=None, description="The keyed hash of the password set on "
                                         "the running QEMU (display.json, for that process only).")
    secret: ObservedSecret | None = Field(default=None, description="The desired display's passwordFile.")


class ObservedLink(_Fact):
    """A host network interface, from netlink."""

    name: str
    kind: str | None = None
    up: bool = False
    master: str | None = None
    addresses: list[str] = Field(default_factory=list)
    ipv6_slaac: bool | None = Field(
        default=None, description="A bridge's accept_ra or autoconf sysctl is on (None: not read, or no IPv6)."
    )


class ObservedDhcp(_Fact):
    """A Network's dnsmasq: its argv if it runs (verified from /proc), and its leases."""

    argv: list[str] | None = None
    pid: int | None = None
    leases: list[DhcpLease] = Field(default_factory=list)


class ObservedHostNetwork(_Fact):
    """Bridges, TAPs, the firewall rules we own (by comment) and what the kernel can do."""

    links: dict[str, ObservedLink] = Field(default_factory=dict)
    firewall: dict[str, str] = Field(
        default_factory=dict, description="'family/chain/infz:HASH' -> comment, for the rules found in our tables."
    )
    table: str = Field(default="", description="Our nftables tables' name (derived from the resolved state "
                       "directory); empty: derive it from state_dir.")
    legacy_table: bool = Field(default=False, description="The shared table 'infinization' of older versions exists.")
    qemu_uid: int | None = Field(default=None, description="The uid of the host's qemuUser, if that user exists.")
    ip_forward: bool = False
    capabilities: HostCapabilities = Field(default_factory=HostCapabilities)
    dhcp: dict[str, ObservedDhcp] = Field(default_factory=dict, description="By Network name.")


class ObservedState(_Fact):
    state_dir: str
    host: ObservedHostNetwork = Field(default_factory=ObservedHostNetwork)
    cpu_host: ObservedCpuHost = Field(default_factory=ObservedCpuHost, description="CPUs, NUMA, hugepages, cpuset.")
    network_records: dict[str, NetworkRecord] = Field(default_factory=dict)
    vms: dict[str, ObservedVM] = Field(default_factory=dict)
    images: dict[str, ObservedImage] = Field(default_factory=dict, description="Backing images, by path.")
    paths: dict[str, ObservedPath] = Field(
        default_factory=dict,
        description="Manifest paths, storage roots and the state directory, resolved (the host policy's facts).",
    )
    listening: list[int] = Field(default_factory=list, description="TCP ports some socket on the host listens "
                                 "on, among the display port range and the fixed display ports wanted.")
    display_ports: dict[str, int] = Field(default_factory=dict, description="Every VM's recorded display port.")
    devices: ObservedHostDevices = Field(default_factory=ObservedHostDevices,
                                         description="Host PCI/USB devices for spec.hostDevices (sysfs).")
    host_memory: int | None = Field(default=None, description="The host's RAM in bytes (None: not known).")

    def digest(self) -> str:
        """What plans depend on (DHCP leases renew all the time, and the guest agent's answers change with the
        guest: both are only reported, never planned on)."""
        data = self.model_dump_json(exclude={"host": {"dhcp": {"__all__": {"leases"}}},
                                             "vms": {"__all__": {"process": {"agent"}}}})
        return hashlib.sha256(data.encode()).hexdigest()

    def vm(self, name: str) -> ObservedVM:
        return self.vms.get(name) or ObservedVM(name=name)
