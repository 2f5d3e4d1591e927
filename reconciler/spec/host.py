"""The host's policy: what manifests may use on this host, set by the host's administrator, not by them.

Manifests come from whoever can commit to the manifests' git repository; this file comes from the host
(``/etc/infinization/config.yaml``, or ``--config FILE`` / ``$INFINIZATION_CONFIG``), and bounds what a
manifest may ask for: which host paths a VM may open (``storageRoots``, ``firmwareDirs``), which user QEMU
runs as (``qemuUser``) and which host ports a user-mode NIC may bind (``portForwardRange``). Loaded by
``spec.loader.load_host_config``; the CLI and the sync daemon hand it to the planner and the executor.
Defaults keep the bundled demo working and name no system directory.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from reconciler.spec.models import AbsolutePath

DEFAULT_CONFIG = "/etc/infinization/config.yaml"
CONFIG_ENV = "INFINIZATION_CONFIG"


def _port_range(value: str) -> str:
    low, sep, high = value.replace(" ", "").partition("-")
    if not sep or not low.isdigit() or not high.isdigit() or not 1 <= int(low) <= int(high) <= 65535:
        raise ValueError(f"{value!r}: expected a port range like '10000-20000'")
    return f"{int(low)}-{int(high)}"


def _default_roots() -> list[str]:
    return ["/var/lib/infinization/images", "/var/cache/infinization"]


def _default_firmware() -> list[str]:
    return ["/usr/share/OVMF", "/usr/share/qemu", "/usr/share/seabios", "/usr/share/edk2/ovmf"]


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

    @model_validator(mode="after")
    def _roots_are_not_the_whole_system(self) -> HostConfig:
        for root in (*self.storageRoots, *self.firmwareDirs):
            if root == "/":
                raise ValueError("a storage root or firmware directory cannot be '/'")
        return self

    @property
    def port_range(self) -> tuple[int, int]:
        low, high = self.portForwardRange.split("-")
        return int(low), int(high)
