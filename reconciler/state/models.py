"""Typed models of the files Infinization keeps in its state directory (pure data).

Each file under ``STATE/`` that we write has its model here and its only reader and writer in
``reconciler.state.files``. The planner reads ``AppliedRecord`` and ``NetworkRecord`` as inputs; the
observers and the executor use the rest through ``state.files``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from reconciler.spec.models import Network, VirtualMachine

RECORD_VERSION = 1

# How a VM's last QEMU ended (exit.json). QMP SHUTDOWN reasons (guest-shutdown, host-qmp-quit...) are kept
# as QEMU spells them; these are the ones we decide on.
STOPPED = "stopped"  # we stopped it (Halted, Manual, `infinization stop`, a restart): not the guest's choice
GUEST_SHUTDOWN = "guest-shutdown"  # the guest powered itself off cleanly
CRASH = "crash"  # QEMU exited without a SHUTDOWN event
PANICKED = "guest-panicked"
FAILURES = frozenset({CRASH, PANICKED})
SHUTDOWN_TRACE = "qemu_system_shutdown_request"
# QEMU 7.2's ShutdownCause, in its order: the number its ``qemu_system_shutdown_request`` trace event
# prints (QEMU writes it to its stderr log when launched with ``-trace``; see ``state.files.exit_from_log``).
SHUTDOWN_CAUSES = ("none", "host-error", "host-qmp-quit", "host-qmp-system-reset", "host-signal", "host-ui",
                   GUEST_SHUTDOWN, "guest-reset", PANICKED, "subsystem-reset", "snapshot-load")


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InstallRecord(_Record):
    """An install from a ``bootOnce`` CD-ROM: begun by a start that booted from it (that QEMU's pid and
    start time), done once that QEMU ended by the guest's own power-off or reboot."""

    cdrom: str
    image: str | None
    pid: int
    start_time: int
    done: bool = False
    ejected: bool = Field(default=False, description="The medium was ejected (ejectAfterInstall).")


class AppliedRecord(_Record):
    """vms/NAME/record.json: the VM as last applied: proof that we manage it, and which disks we created."""

    vm: VirtualMachine
    owned_disks: list[str] = Field(default_factory=list)
    installs: list[InstallRecord] = Field(default_factory=list, description="Installs from bootOnce CD-ROMs.")
    source: str | None = None
    revision: str | None = Field(default=None, description="The manifests' git revision when last applied.")
    placement_cpus: list[int] = Field(default_factory=list, description="The host CPUs a placement strategy chose "
                                      "(one per vCPU), kept so the choice stays stable.")


class NetworkRecord(_Record):
    """networks/NAME.json: a Network we created: the proof that its bridge is ours to delete."""

    network: Network


class LaunchRecord(_Record):
    """vms/NAME/launch.json: the argv and spec of the QEMU we started (trusted only while /proc agrees).

    Written before QEMU starts (argv, spec, user, binary, the boot clock), then again with its pid and start
    time once it runs: a process is this VM's QEMU only when all of them match /proc
    (``adapters.procfs.examine``). A record without a pid (the start was interrupted between the launch
    and its record) names a process that started after ``not_before`` and matches all the rest.
    """

    version: int = RECORD_VERSION
    argv: list[str]
    vm: VirtualMachine
    uid: int | None = Field(default=None, description="The user QEMU runs as.")
    binary: str | None = Field(default=None, description="The QEMU binary (its /proc/PID/exe).")
    not_before: int | None = Field(default=None, description="The boot clock in clock ticks (CLOCK_BOOTTIME, "
                                   "as /proc/PID/stat counts a start time) when this record was written, "
                                   "before the launch.")
    pid: int | None = None
    start_time: int | None = Field(default=None, description="Its start time in clock ticks (/proc/PID/stat).")


class TpmLaunchRecord(_Record):
    """vms/NAME/swtpm.json: the swtpm we started for the VM's TPM (trusted only while /proc agrees)."""

    argv: list[str]
    uid: int | None = None
    binary: str | None = None
    not_before: int | None = None  # as LaunchRecord's
    pid: int | None = None
    start_time: int | None = None


class LiveRecord(_Record):
    """vms/NAME/live.json: what QMP cannot tell us back (link state, balloon target, unplugs we asked for).

    Valid only for the process it names: a restarted QEMU starts with links up, no balloon target and no
    pending unplug, so a record for another pid/start time is ignored.
    """

    pid: int
    start_time: int
    links: dict[str, str] = Field(default_factory=dict)
    balloon_target: int | None = None
    unplugs: list[str] = Field(default_factory=list)


class DisplayPassword(_Record):
    """The password set on one QEMU: a keyed hash (HMAC-SHA256 under ``display.key``), never the secret."""

    digest: str
    pid: int
    start_time: int


class DisplayRecord(_Record):
    """vms/NAME/display.json: the VM's display port (stable across restarts, never another VM's) and the
    password set on its running QEMU (valid only for the process it names)."""

    port: int | None = None
    password: DisplayPassword | None = None


class ExitRecord(_Record):
    """vms/NAME/exit.json: how the VM's last QEMU ended."""

    reason: str
    guest: bool | None = Field(default=None, description="SHUTDOWN's 'guest' flag, when QEMU sent one.")
    how: str | None = Field(default=None, description="For a stop by us: power button, quit or SIGKILL.")


class NodeOwner(_Record):
    """A device node's owner and mode before we gave it to QEMU's user (restored when released)."""

    path: str
    uid: int
    gid: int
    mode: int


class HostDeviceClaim(_Record):
    """One host device we took for a VM (hostdevs.json): written *before* the host is changed, so a crash
    in between leaves a claim the next plan finishes or releases, with the driver to give the device back.

    Keyed by the PCI address (every member of a passed-through function's IOMMU group has its own claim) or
    by ``usb:BUS-PORT`` for a USB device."""

    vm: str
    device: str = Field(description="The name in the VM's spec.hostDevices that made us take it.")
    original_driver: str | None = Field(default=None, description="PCI: the driver it had before (None: none).")
    group: str | None = Field(default=None, description="PCI: its IOMMU group.")
    node: NodeOwner | None = Field(default=None, description="The device node given to QEMU's user (/dev/vfio/N, "
                                   "/dev/bus/usb/B/D) and its owner and mode before.")


class HostDeviceClaims(_Record):
    """hostdevs.json: every host device we hold for a VM, by key."""

    claims: dict[str, HostDeviceClaim] = Field(default_factory=dict)


class SourceRecord(_Record):
    """source.json: the manifest directory last applied (``status`` and ``start``/``stop`` default to it)."""

    manifests: str


class DhcpLease(_Record):
    """One line of a Network's dnsmasq lease file (networks/NAME.leases, written by dnsmasq)."""

    mac: str
    ip: str
    hostname: str | None = None
    expires: int = 0
