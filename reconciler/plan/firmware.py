"""UEFI firmware and boot devices, as pure rules over observed facts.

Which OVMF files exist is a fact: ``probe_paths`` names every candidate (the known Debian and Fedora file
names, inside each of the host's ``firmwareDirs``), the observer records an ``ObservedPath`` for each
(``ObservedState.paths``), and ``select`` picks the first usable pair, best first: the 4M builds before
the 2M ones; with ``secureBoot`` the Secure Boot code (needs SMM) with the Microsoft-keys VARS template
(Secure Boot already enabled), as Debian's README.Debian pairs them. A file must pass the host policy
with the firmware directories as its roots (``policy.path_refusal``), like a manifest path with the
storage roots. No usable pair is a refusal naming the package to install, never a fall back to BIOS.
The executor re-probes with the same rule right before it starts QEMU (``adapters.paths.require_firmware``).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from reconciler.plan.policy import Facts, path_refusal
from reconciler.spec.host import HostConfig
from reconciler.spec.models import VirtualMachineSpec
from reconciler.spec.naming import boot_devices

PACKAGE = "ovmf"
"""The Debian package that ships OVMF (Fedora: edk2-ovmf)."""

# (code, VARS template) file names, best first.
_PLAIN = (
    ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),  # Debian, 4M
    ("OVMF_CODE.fd", "OVMF_VARS.fd"),  # Fedora (edk2/ovmf), Debian 2M
)
_SECURE = (
    ("OVMF_CODE_4M.ms.fd", "OVMF_VARS_4M.ms.fd"),  # Debian, 4M: .ms.fd is a link to .secboot.fd
    ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd"),
    ("OVMF_CODE.secboot.fd", "OVMF_VARS.secboot.fd"),  # Fedora: its secboot VARS have Microsoft's keys
    ("OVMF_CODE.ms.fd", "OVMF_VARS.ms.fd"),  # Debian 2M
)


@dataclass(frozen=True)
class Firmware:
    """The OVMF files a UEFI VM gets, resolved: read-only code (pflash0) and the VARS template its own
    variable store is copied from once (pflash1 is that copy)."""

    code: str
    vars_template: str
    secure_boot: bool


def probe_paths(host: HostConfig) -> list[str]:
    """Every candidate firmware file the observer should record a fact for."""
    names = sorted({name for pair in (*_PLAIN, *_SECURE) for name in pair})
    return [posixpath.join(directory, name) for directory in host.firmwareDirs for name in names]


def _usable(path: str, facts: Facts, host: HostConfig, state_dir: str) -> bool:
    fact = facts.get(path)
    return fact is not None and fact.kind == "file" and \
        path_refusal("firmware", path, facts, host.firmwareDirs, state_dir) is None


def select(spec: VirtualMachineSpec, facts: Facts, host: HostConfig, state_dir: str) -> Firmware | str | None:
    """The firmware for a UEFI VM (None for BIOS), or why there is none."""
    if spec.firmware.type != "uefi":
        return None
    secure = spec.firmware.secureBoot
    for code, template in _SECURE if secure else _PLAIN:
        for directory in host.firmwareDirs:
            pair = posixpath.join(directory, code), posixpath.join(directory, template)
            if all(_usable(path, facts, host, state_dir) for path in pair):
                return Firmware(code=facts[pair[0]].resolved, vars_template=facts[pair[1]].resolved,
                                secure_boot=secure)
    wanted = ", ".join(f"{code} + {template}" for code, template in (_SECURE if secure else _PLAIN))
    return (f"spec.firmware: no OVMF firmware for UEFI{' with Secure Boot' if secure else ''} in the host's "
            f"firmwareDirs ({', '.join(host.firmwareDirs) or 'none'}; looked for {wanted}): install the "
            f"Debian package `{PACKAGE}` (Fedora: edk2-ovmf) or add its directory to firmwareDirs")


def boot_refusal(spec: VirtualMachineSpec) -> str | None:
    """A VM with neither a kernel nor a bootable device (a disk, a CD-ROM with a medium) in its order (the
    planner refuses to start such a VM)."""
    if spec.boot is not None:
        return None
    media = {f"cdrom:{cdrom.name}" for cdrom in spec.cdroms if cdrom.image}
    if any(entry.startswith("disk:") or entry in media for entry in boot_devices(spec)):
        return None
    order = ", ".join(spec.bootOrder) if spec.bootOrder else "none: the default is the disks, and there are none"
    return (f"spec.bootOrder: nothing to boot: no boot.kernel and no disk or CD-ROM with a medium in the boot "
            f"order ({order})")


def refusals(spec: VirtualMachineSpec, facts: Facts, host: HostConfig, state_dir: str) -> list[str]:
    """Why this VM's firmware cannot be had on this host (none for BIOS)."""
    found = select(spec, facts, host, state_dir)
    return [found] if isinstance(found, str) else []

