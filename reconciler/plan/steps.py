"""The plan's steps: one frozen, typed model per kind of step, joined in the discriminated union ``Step``.

A step kind is defined once, here: its ``kind`` (the ``StepKind`` member), its arguments as typed fields,
and its ``phase``, which orders a VM's steps (the planner sorts by it, stably, so equal phases keep the
order they were planned in). The executor handles every member of ``Step`` in an exhaustive ``match``
ending in ``assert_never``, so a kind added here without a handler is a mypy error
(``tests/unit/test_step_exhaustiveness.py`` proves it). See "How to add a device" in docs/architecture.md.

In JSON (``plan --json``, saved plans) a step reads ``{"kind", "name", "target", "args": {...},
"summary"}``: the typed fields travel under ``args``, their keys camelCase when dumped ``by_alias`` (the
published document); ``destroys_data`` marks the kinds that delete what cannot be made again.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator
from pydantic.alias_generators import to_camel

from reconciler.spec.models import Network, VirtualMachine


class StepKind(StrEnum):
    WRITE_RECORD = "write-record"
    CREATE_DISK = "create-disk"
    GROW_DISK_LIVE = "grow-disk-live"
    GROW_DISK_OFFLINE = "grow-disk-offline"
    STOP = "stop"
    START = "start"
    DELETE_DISK = "delete-disk"
    FORGET = "forget"
    HOTPLUG_DISK = "hotplug-disk"
    UNPLUG_DISK = "unplug-disk"
    HOTPLUG_NIC = "hotplug-nic"
    UNPLUG_NIC = "unplug-nic"
    SET_LINK = "set-link"
    SET_IO_LIMITS = "set-io-limits"
    ADD_CPUS = "add-cpus"
    ADD_MEMORY = "add-memory"
    SET_BALLOON = "set-balloon"
    HOTPLUG_CDROM = "hotplug-cdrom"
    UNPLUG_CDROM = "unplug-cdrom"
    CHANGE_MEDIA = "change-media"
    WRITE_NETWORK_RECORD = "write-network-record"
    ENSURE_BRIDGE = "ensure-bridge"
    DELETE_BRIDGE = "delete-bridge"
    FORGET_NETWORK = "forget-network"
    APPLY_FIREWALL = "apply-firewall"
    REPAIR_TAP = "repair-tap"
    ENSURE_DHCP = "ensure-dhcp"
    STOP_DHCP = "stop-dhcp"
    STOP_TPM = "stop-tpm"
    DELETE_TPM_STATE = "delete-tpm-state"
    CREATE_EFI_VARS = "create-efi-vars"
    DELETE_EFI_VARS = "delete-efi-vars"
    RESET_EFI_VARS = "reset-efi-vars"
    FINISH_INSTALL = "finish-install"
    RECORD_DISPLAY_PORT = "record-display-port"
    SET_DISPLAY_PASSWORD = "set-display-password"
    PREPARE_HOST_DEVICE = "prepare-host-device"
    RELEASE_HOST_DEVICE = "release-host-device"
    HOTPLUG_HOST_DEVICE = "hotplug-host-device"
    UNPLUG_HOST_DEVICE = "unplug-host-device"
    SET_PLACEMENT = "set-placement"
    PAUSE = "pause"
    RESUME = "resume"
    RECORD_LAUNCH = "record-launch"


class Phase:
    """The order of a VM's steps: the record first (our claim), then what must happen while the old QEMU
    runs, the stop, what needs it stopped, then live changes, the start, and forgetting the VM last."""

    RECORD = 0
    RESUME = 5  # first: a paused guest cannot answer a hot-plug or an unplug
    UNPLUG = 10
    GROW_LIVE = 20
    CREATE = 30
    STOP = 40
    OFFLINE = 50
    DELETE = 60
    REPAIR = 70
    PLUG = 80
    SETTING = 90
    START = 100
    PLACE = 105  # after the start (the vCPU threads exist) and after vCPUs added live
    PAUSE = 107  # last on a running VM: the live changes before it still reach a guest that runs
    FORGET = 110
    HOST = 0  # Network and firewall steps: each change lists them in order already


_HEAD = ("kind", "name", "target", "summary")


class _StepBase(BaseModel):
    """What every step has: the resource it acts on (``name``), the device (``target``) and a summary."""

    # Each kind is built when the first step of it is made (or a plan is read back): a plan uses a few kinds.
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True,
                              defer_build=True)

    name: str = Field(description="The VM, Network or firewall the step acts on.")
    target: str = ""
    summary: str

    phase: ClassVar[int]
    destroys_data: ClassVar[bool] = False  # deletes what no later step can make again (plan: destroysData)

    @model_validator(mode="before")
    @classmethod
    def _from_nested(cls, data: Any) -> Any:
        """Accept the JSON form, whose typed fields sit under ``args``."""
        if isinstance(data, dict) and isinstance(data.get("args"), dict):
            data = {**{k: v for k, v in data.items() if k != "args"}, **data["args"]}
        return data

    @model_serializer(mode="wrap")
    def _to_nested(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        flat: dict[str, Any] = handler(self)
        head = {key: flat.pop(key) for key in _HEAD}
        return {"kind": head["kind"], "name": head["name"], "target": head["target"], "args": flat,
                "summary": head["summary"]}

    @property
    def args(self) -> dict[str, Any]:
        """The step's own arguments, as JSON data (for logs and tests)."""
        args: dict[str, Any] = self.model_dump(mode="json")["args"]
        return args


# -- a VM's record, disks and process -------------------------------------------------------------------


class WriteRecord(_StepBase):
    kind: Literal[StepKind.WRITE_RECORD] = StepKind.WRITE_RECORD
    phase = Phase.RECORD
    vm: VirtualMachine


class RecordLaunch(_StepBase):
    """Finish the record of a QEMU whose start was interrupted between the launch and its record (it was
    adopted on everything but the pid), as a start does: QEMU moved into its cgroup, the installs its start
    began recorded, the last run's exit cleared and, last, its pid into launch.json. Only for that very
    process (``pid``), re-verified first."""

    kind: Literal[StepKind.RECORD_LAUNCH] = StepKind.RECORD_LAUNCH
    phase = Phase.RECORD
    pid: int


class CreateDisk(_StepBase):
    kind: Literal[StepKind.CREATE_DISK] = StepKind.CREATE_DISK
    phase = Phase.CREATE
    path: str
    size: int | None
    image: str | None
    image_format: Literal["qcow2", "raw"] = "qcow2"
    preallocation: Literal["off", "metadata", "falloc", "full"] = "off"


class GrowDiskLive(_StepBase):
    kind: Literal[StepKind.GROW_DISK_LIVE] = StepKind.GROW_DISK_LIVE
    phase = Phase.GROW_LIVE
    node: str
    size: int
    path: str


class GrowDiskOffline(_StepBase):
    kind: Literal[StepKind.GROW_DISK_OFFLINE] = StepKind.GROW_DISK_OFFLINE
    phase = Phase.OFFLINE
    size: int
    path: str


class Stop(_StepBase):
    kind: Literal[StepKind.STOP] = StepKind.STOP
    phase = Phase.STOP
    timeout: int


class Start(_StepBase):
    kind: Literal[StepKind.START] = StepKind.START
    phase = Phase.START


class DeleteDisk(_StepBase):
    kind: Literal[StepKind.DELETE_DISK] = StepKind.DELETE_DISK
    phase = Phase.DELETE
    destroys_data = True
    path: str


class Forget(_StepBase):
    kind: Literal[StepKind.FORGET] = StepKind.FORGET
    phase = Phase.FORGET


class StopTpm(_StepBase):
    """Stop a swtpm of ours left without its QEMU (a crash, or a kill -9 between the two launches)."""

    kind: Literal[StepKind.STOP_TPM] = StepKind.STOP_TPM
    phase = Phase.STOP


class DeleteTpmState(_StepBase):
    kind: Literal[StepKind.DELETE_TPM_STATE] = StepKind.DELETE_TPM_STATE
    phase = Phase.DELETE
    destroys_data = True
    path: str


class CreateEfiVars(_StepBase):
    """Copy OVMF's VARS template to the VM's own variable store, once (an existing store is kept)."""

    kind: Literal[StepKind.CREATE_EFI_VARS] = StepKind.CREATE_EFI_VARS
    phase = Phase.CREATE
    path: str
    template: str
    secure_boot: bool | None = None  # the template's kind, kept beside the store (None: a plan from before)


class DeleteEfiVars(_StepBase):
    kind: Literal[StepKind.DELETE_EFI_VARS] = StepKind.DELETE_EFI_VARS
    phase = Phase.DELETE
    destroys_data = True
    path: str


class ResetEfiVars(_StepBase):
    """Secure Boot toggled: keep the VM's variable store as a dated backup and copy the new template (only
    while QEMU is stopped; a store already from a template of this kind is kept)."""

    kind: Literal[StepKind.RESET_EFI_VARS] = StepKind.RESET_EFI_VARS
    phase = Phase.OFFLINE
    path: str
    template: str
    secure_boot: bool


class FinishInstall(_StepBase):
    """Record that the installs from these bootOnce CD-ROMs ended (and which media are ejected)."""

    kind: Literal[StepKind.FINISH_INSTALL] = StepKind.FINISH_INSTALL
    phase = Phase.RECORD
    cdroms: list[str]
    ejected: list[str]


DeviceKey = Annotated[str, Field(pattern=r"^([0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]|usb:[1-9][0-9]*-[0-9.]+)$")]
"""A host device's claim key: a PCI address, or usb:BUS-PORT (validated: the executor builds sysfs paths)."""


class PrepareHostDevice(_StepBase):
    """Take a host device for the VM: a PCI function's IOMMU group bound to vfio-pci (each member's driver
    recorded first) and /dev/vfio/GROUP given to QEMU's user; or a USB device's node given to QEMU's user."""

    kind: Literal[StepKind.PREPARE_HOST_DEVICE] = StepKind.PREPARE_HOST_DEVICE
    phase = Phase.CREATE
    bus: Literal["pci", "usb"]
    address: DeviceKey = Field(description="PCI: the function asked for; USB: its key usb:BUS-PORT.")
    members: list[DeviceKey] = Field(default_factory=list, description="PCI: the group's members to bind (no "
                                     "bridges), as planned; the executor reads the group again.")
    group: Annotated[str, Field(pattern=r"^[0-9]{1,6}$")] | None = None
    node: str | None = Field(default=None, description="USB: its device node (shown; the executor finds it again).")


class ReleaseHostDevice(_StepBase):
    """Give host devices back: each PCI member unbound from vfio-pci and re-probed to its recorded driver,
    each device node's owner and mode restored, the claims dropped. Never while the VM's QEMU has them."""

    kind: Literal[StepKind.RELEASE_HOST_DEVICE] = StepKind.RELEASE_HOST_DEVICE
    phase = Phase.DELETE
    keys: list[DeviceKey]


# -- a running VM, over QMP -----------------------------------------------------------------------------


class HotplugDisk(_StepBase):
    kind: Literal[StepKind.HOTPLUG_DISK] = StepKind.HOTPLUG_DISK
    phase = Phase.PLUG
    iops: int
    bps: int


class UnplugDisk(_StepBase):
    kind: Literal[StepKind.UNPLUG_DISK] = StepKind.UNPLUG_DISK
    phase = Phase.UNPLUG


class HotplugNic(_StepBase):
    kind: Literal[StepKind.HOTPLUG_NIC] = StepKind.HOTPLUG_NIC
    phase = Phase.PLUG
    link: Literal["up", "down"]


class UnplugNic(_StepBase):
    kind: Literal[StepKind.UNPLUG_NIC] = StepKind.UNPLUG_NIC
    phase = Phase.UNPLUG


class SetLink(_StepBase):
    kind: Literal[StepKind.SET_LINK] = StepKind.SET_LINK
    phase = Phase.SETTING
    up: bool


class SetIoLimits(_StepBase):
    kind: Literal[StepKind.SET_IO_LIMITS] = StepKind.SET_IO_LIMITS
    phase = Phase.SETTING
    iops: int
    bps: int


class AddCpus(_StepBase):
    kind: Literal[StepKind.ADD_CPUS] = StepKind.ADD_CPUS
    phase = Phase.SETTING
    count: int


class AddMemory(_StepBase):
    kind: Literal[StepKind.ADD_MEMORY] = StepKind.ADD_MEMORY
    phase = Phase.SETTING
    size: int
    hugepages: str | None = None  # the hugetlbfs directory, when the base memory is on hugepages


class SetPlacement(_StepBase):
    """Pin the running QEMU's threads: each vCPU thread (by its index; its thread id is asked from QMP when the
    step runs) to its CPUs, the other threads to ``emulator``, and QEMU into its cpuset cgroup
    (``cgroup_cpus`` None: none)."""

    kind: Literal[StepKind.SET_PLACEMENT] = StepKind.SET_PLACEMENT
    phase = Phase.PLACE
    vcpus: dict[int, str]
    emulator: str
    cgroup_cpus: str | None
    cgroup_mems: str
    chosen: list[int] = Field(default_factory=list, description="CPUs a strategy chose: recorded once pinned.")


class Pause(_StepBase):
    """Stop the running VM's vCPUs (QMP ``stop``), re-checking ``query-status`` first: only a running VM is
    paused; one paused already is left alone."""

    kind: Literal[StepKind.PAUSE] = StepKind.PAUSE
    phase = Phase.PAUSE


class Resume(_StepBase):
    """Let a VM we paused (``paused``, or ``prelaunch``: started with -S) run again (QMP ``cont``), re-checking
    ``query-status`` first: a VM QEMU paused by itself (io-error, guest-panicked...) is refused, not resumed."""

    kind: Literal[StepKind.RESUME] = StepKind.RESUME
    phase = Phase.RESUME
    from_state: str = Field(default="paused", description="The run state it was planned from: a state QEMU "
                            "paused the VM in itself is resumed only when it is still that one.")


class SetBalloon(_StepBase):
    kind: Literal[StepKind.SET_BALLOON] = StepKind.SET_BALLOON
    phase = Phase.SETTING
    size: int


class HotplugCdrom(_StepBase):
    kind: Literal[StepKind.HOTPLUG_CDROM] = StepKind.HOTPLUG_CDROM
    phase = Phase.PLUG
    image: str | None


class UnplugCdrom(_StepBase):
    kind: Literal[StepKind.UNPLUG_CDROM] = StepKind.UNPLUG_CDROM
    phase = Phase.UNPLUG


class ChangeMedia(_StepBase):
    kind: Literal[StepKind.CHANGE_MEDIA] = StepKind.CHANGE_MEDIA
    phase = Phase.SETTING
    image: str | None


class HotplugHostDevice(_StepBase):
    """device_add a passed-through device: usb-host on the xHCI controller, or vfio-pci on a spare root port."""

    kind: Literal[StepKind.HOTPLUG_HOST_DEVICE] = StepKind.HOTPLUG_HOST_DEVICE
    phase = Phase.PLUG


class UnplugHostDevice(_StepBase):
    kind: Literal[StepKind.UNPLUG_HOST_DEVICE] = StepKind.UNPLUG_HOST_DEVICE
    phase = Phase.UNPLUG


class RepairTap(_StepBase):
    kind: Literal[StepKind.REPAIR_TAP] = StepKind.REPAIR_TAP
    phase = Phase.REPAIR
    tap: str
    bridge: str | None


# -- the display ------------------------------------------------------------------------------------------


class RecordDisplayPort(_StepBase):
    """Keep ``port`` for the VM's display (display.json): stable across restarts, never another VM's."""

    kind: Literal[StepKind.RECORD_DISPLAY_PORT] = StepKind.RECORD_DISPLAY_PORT
    phase = Phase.RECORD
    port: int


class SetDisplayPassword(_StepBase):
    """Read the passwordFile (re-checked against the host policy) and set it on the running QEMU over QMP
    (``set_password``, then ``expire_password``). The step carries the file's path, never the password."""

    kind: Literal[StepKind.SET_DISPLAY_PASSWORD] = StepKind.SET_DISPLAY_PASSWORD
    phase = Phase.SETTING
    protocol: Literal["vnc", "spice"]
    path: str
    expires_after: int | None = None


# -- host networking ------------------------------------------------------------------------------------


class WriteNetworkRecord(_StepBase):
    kind: Literal[StepKind.WRITE_NETWORK_RECORD] = StepKind.WRITE_NETWORK_RECORD
    phase = Phase.HOST
    network: Network


class EnsureBridge(_StepBase):
    kind: Literal[StepKind.ENSURE_BRIDGE] = StepKind.ENSURE_BRIDGE
    phase = Phase.HOST
    bridge: str
    address: str | None
    remove_address: str | None
    ip_forward: bool
    ipv6: bool = False  # False: accept_ra=0 and autoconf=0 on the bridge


class DeleteBridge(_StepBase):
    kind: Literal[StepKind.DELETE_BRIDGE] = StepKind.DELETE_BRIDGE
    phase = Phase.HOST
    bridge: str


class ForgetNetwork(_StepBase):
    kind: Literal[StepKind.FORGET_NETWORK] = StepKind.FORGET_NETWORK
    phase = Phase.HOST


class ApplyFirewall(_StepBase):
    kind: Literal[StepKind.APPLY_FIREWALL] = StepKind.APPLY_FIREWALL
    phase = Phase.HOST
    script: str


class EnsureDhcp(_StepBase):
    kind: Literal[StepKind.ENSURE_DHCP] = StepKind.ENSURE_DHCP
    phase = Phase.HOST
    argv: list[str]
    pidfile: str


class StopDhcp(_StepBase):
    kind: Literal[StepKind.STOP_DHCP] = StepKind.STOP_DHCP
    phase = Phase.HOST
    pidfile: str


VMStep = (WriteRecord | CreateDisk | GrowDiskLive | GrowDiskOffline | Stop | Start | DeleteDisk | Forget
          | StopTpm | DeleteTpmState | CreateEfiVars | DeleteEfiVars | ResetEfiVars | FinishInstall
          | RecordDisplayPort | SetDisplayPassword | PrepareHostDevice | ReleaseHostDevice | RecordLaunch)
"""Steps on a VM's record, disk files and process."""
LiveStep = (HotplugDisk | UnplugDisk | HotplugNic | UnplugNic | SetLink | SetIoLimits | AddCpus | AddMemory
            | SetBalloon | HotplugCdrom | UnplugCdrom | ChangeMedia | HotplugHostDevice | UnplugHostDevice
            | SetPlacement | Pause | Resume)
"""Steps on a running VM, over its QMP monitor."""
HostStep = WriteNetworkRecord | EnsureBridge | DeleteBridge | ForgetNetwork | ApplyFirewall | RepairTap | EnsureDhcp \
    | StopDhcp
"""Steps on host networking (netlink, nftables, dnsmasq)."""

Step = Annotated[VMStep | LiveStep | HostStep, Field(discriminator="kind")]
"""Any step of a plan; ``kind`` tells which."""


def in_order(steps: list[Step]) -> list[Step]:
    """A VM's steps sorted by phase; steps of one phase keep the order they were planned in."""
    return sorted(steps, key=lambda step: step.phase)
