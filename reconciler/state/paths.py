"""The state-directory paths the planner names in its steps, as plain strings (pure: no file system).

``state.layout`` builds its ``Path`` objects on these, so each path has one definition; the planner uses
them directly because it may not import ``pathlib`` (it shows the paths a step will touch).
"""

from __future__ import annotations

import posixpath


def disk_file(state_dir: str, vm: str, disk: str) -> str:
    """A VM's disk image: outside the VM's folder, so forgetting a VM keeps its disks."""
    return posixpath.join(state_dir, "disks", vm, f"{disk}.qcow2")


def efi_vars(state_dir: str, vm: str) -> str:
    """A UEFI VM's own copy of the OVMF variables: beside its disks (its boot entries and keys go with them),
    so forgetting the VM keeps it; deleted only with the VM when none of its disks is kept."""
    return posixpath.join(state_dir, "disks", vm, "efivars.fd")


def dhcp_pidfile(state_dir: str, network: str) -> str:
    return posixpath.join(state_dir, "networks", f"{network}.dnsmasq.pid")


def dhcp_leases(state_dir: str, network: str) -> str:
    return posixpath.join(state_dir, "networks", f"{network}.leases")


def tpm_state(state_dir: str, vm: str) -> str:
    """A VM's TPM state (swtpm's directory): outside the VM's folder, so forgetting a VM keeps it."""
    return posixpath.join(state_dir, "tpm", vm)


def seed_file(state_dir: str, vm: str, digest: str) -> str:
    """A VM's cloud-init NoCloud seed ISO, named by a hash of its content (a new content is a new file)."""
    return posixpath.join(state_dir, "vms", vm, f"cidata-{digest[:16]}.iso")
