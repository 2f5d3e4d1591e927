"""The host's policy: what manifests may use on this host, set by the host's administrator, not by them.

Manifests come from whoever can commit to the manifests' git repository; this file comes from the host
(``/etc/infinization/config.yaml``, or ``--config FILE`` / ``$INFINIZATION_CONFIG``), and bounds what a
manifest may ask for: which host paths a VM may open (``storageRoots``, ``firmwareDirs``), which user QEMU
runs as (``qemuUser``), which host ports a user-mode NIC may bind (``portForwardRange``), which ports
a display may listen on (``displayPortRange``) and where display passwords may be read from (``secretDirs``). Loaded by
``spec.loader.load_host_config``; the CLI and the sync daemon hand it to the planner and the executor.
Defaults keep the bundled demo working and name no system directory.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from reconciler.spec.hostdev import PciAddress
from reconciler.spec.models import VNC_BASE_PORT, AbsolutePath

DEFAULT_CONFIG = "/etc/infinization/config.yaml"
CONFIG_ENV = "INFINIZATION_CONFIG"


def _port_range(value: str) -> str:
    low, sep, high = value.replace(" ", "").partition("-")
    if not sep or not low.isdigit() or not high.isdigit() or not 1 <= int(low) <= int(high) <= 65535:
        raise ValueError(f"{value!r}: expected a port range like '10000-20000'")
    return f"{int(low)}-{int(high)}"


def _default_roots() -> list[str]:
    return ["/var/lib/infinization/images", "/var/cache/infinization"]


def _usb_ids(value: str) -> str:
    vendor, sep, product = value.lower().partition(":")
    hexdigits = set("0123456789abcdef")
    if not sep or len(vendor) != 4 or len(product) != 4 or not set(vendor + product) <= hexdigits:
        raise ValueError(f"{value!r}: expected USB ids like 1050:0407 (vendor:product, hex)")
    return f"{vendor}:{product}"


def _default_unbind() -> list[str]:
    # Drivers of devices a host does not depend on for its own storage, network or console: a GPU's
    # audio function, a spare USB controller. A GPU driver is not here on purpose (it may be the console).
    return ["snd_hda_intel", "xhci_hcd", "ehci-pci", "ohci-pci", "pci-stub"]


def _default_firmware() -> list[str]:
    return ["/usr/share/OVMF", "/usr/share/qemu", "/usr/share/seabios", "/usr/share/edk2/ovmf"]


def _default_secrets() -> list[str]:
    return ["/etc/infinization/secrets"]


class HostConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    storageRoots: list[AbsolutePath] = Field(
        default_factory=_default_roots,
        description="Directories a manifest's images, ISOs, kernels and initrds may come from (after symlinks).",
    )
    firmwareDirs: list[AbsolutePath] = Field(
        default_factory=_default_firmware, description="Directories firmware files may come from."
    )
    qemuUser: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")] = Field(
        default="infinization-qemu", description="The unprivileged user QEMU runs as (created by setup)."
    )
    qemuBinary: AbsolutePath = Field(
        default="/usr/bin/qemu-system-x86_64", description="The QEMU a VM's process must be (its /proc exe)."
    )
    swtpmBinary: AbsolutePath = Field(
        default="/usr/bin/swtpm", description="The swtpm a VM's TPM process must be (its /proc exe)."
    )
    startTimeout: int = Field(
        default=30, ge=1, le=600,
        description="Seconds a started QEMU has to report its guest running; then the QEMU we launched is killed.",
    )
    portForwardRange: Annotated[str, AfterValidator(_port_range)] = Field(
        default="10000-20000", description="Host ports a user-mode NIC's portForwards may bind."
    )
    hugepagesDir: AbsolutePath = Field(
        default="/run/infinization/hugepages", description="Where the executor mounts a private hugetlbfs per page "
        "size (2M, 1G) for QEMU's user (mode 0700), for VMs with memory.hugepages.")
    cpusetCgroup: Literal["required", "off"] = Field(
        default="required", description="required: a pinned VM's QEMU goes into a cpuset cgroup of its own, and a "
        "host without the cpuset controller refuses pinned VMs at plan time. off: thread affinity only.")

    displayPortRange: Annotated[str, AfterValidator(_port_range)] = Field(
        default="5900-5999", description="Ports a display with port: auto is given (each VM keeps its own); a "
        "fixed display port must be in it too. Not below 5900 (QEMU's VNC counts displays from 5900).")
    secretDirs: list[AbsolutePath] = Field(
        default_factory=_default_secrets, description="Directories a display's passwordFile may be in (after "
        "symlinks); the file must be root's and not readable by group or others.")

    @model_validator(mode="after")
    def _display_ports_fit_vnc(self) -> HostConfig:
        if self.display_port_range[0] < VNC_BASE_PORT:
            raise ValueError(f"displayPortRange must start at {VNC_BASE_PORT} or above (VNC's display 0)")
        return self

    @property
    def display_port_range(self) -> tuple[int, int]:
        low, high = self.displayPortRange.split("-")
        return int(low), int(high)
    sysfsRoot: AbsolutePath = Field(
        default="/sys", description="Where sysfs is mounted (tests point it at a fake tree): PCI and USB devices, "
        "IOMMU groups, driver binding.")
    devRoot: AbsolutePath = Field(
        default="/dev", description="Where device nodes are (/dev/vfio/GROUP, /dev/bus/usb/BUS/DEV).")
    pciPassthrough: list[PciAddress] = Field(
        default_factory=list, description="PCI functions a manifest may pass through (every member of their IOMMU "
        "groups too); none by default.")
    usbPassthrough: list[Annotated[str, AfterValidator(_usb_ids)]] = Field(
        default_factory=list, description="USB devices (vendor:product, hex) a manifest may pass through; none by "
        "default.")
    vfioUnbindDrivers: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]] = Field(
        default_factory=_default_unbind, description="Host drivers a passed-through PCI function (or a member of "
        "its IOMMU group) may be unbound from; bound to any other driver it is refused as in use by the host.")

    @model_validator(mode="after")
    def _roots_are_not_the_whole_system(self) -> HostConfig:
        for root in (*self.storageRoots, *self.firmwareDirs, *self.secretDirs):
            if root == "/":
                raise ValueError("a storage root or firmware directory cannot be '/'")
        return self

    @property
    def port_range(self) -> tuple[int, int]:
        low, high = self.portForwardRange.split("-")
        return int(low), int(high)
