"""QEMU ids of a VM's devices and block nodes, derived from the names in its spec (pure).

One definition each, used by the argv builder, the planner (step arguments), the observers (to recognise
devices in QMP answers) and the executor (hot-plug). Disk, NIC and CD-ROM names are validated by the spec
models, so every id here is a safe QEMU id.
"""

from __future__ import annotations

import hashlib
import uuid

from reconciler.spec.models import VirtualMachineSpec


def disk_node(disk_name: str) -> str:
    """The QEMU format-node name of a disk (what ``block_resize`` targets); also its device id."""
    return f"disk-{disk_name}"


def disk_file_node(disk_name: str) -> str:
    return f"file-{disk_name}"


def backing_node(disk_name: str) -> str:
    """The read-only format node of a linked clone's backing image (given to QEMU explicitly, as an fd)."""
    return f"base-{disk_name}"


def backing_file_node(disk_name: str) -> str:
    return f"basefile-{disk_name}"


def nic_device(nic_name: str) -> str:
    return f"nic-{nic_name}"


def nic_netdev(nic_name: str) -> str:
    return f"net-{nic_name}"


def cdrom_device(cdrom_name: str) -> str:
    """The scsi-cd device id of a CD-ROM drive; its medium's format node has the same name."""
    return f"cd-{cdrom_name}"


def cdrom_file_node(cdrom_name: str) -> str:
    return f"cdfile-{cdrom_name}"


def host_device(name: str) -> str:
    """A passed-through host device's QEMU id (vfio-pci or usb-host)."""
    return f"hostdev-{name}"


def root_port(device_id: str) -> str:
    """The PCIe root port a cold-plugged device sits on (q35), so it can be unplugged live too."""
    return f"rp-{device_id}"


def spare_port(index: int) -> str:
    """A spare PCIe root port reserved at start for a device added live (q35)."""
    return f"hp-{index}"


SCSI_CONTROLLER = "scsi0"
TPM_CHARDEV = "chrtpm"
TPM_BACKEND = "tpm0"
TPM_DEVICE = "tpm-crb0"
BALLOON_DEVICE = "balloon0"
RNG_OBJECT = "rng0-source"
RNG_DEVICE = "rng0"
SERIAL_CONTROLLER = "vserial0"
AGENT_CHARDEV = "chr-qga0"
AGENT_DEVICE = "qga0"
# The display's devices (one each per VM).
VIDEO_DEVICE = "video0"
USB_CONTROLLER = "usb0"
TABLET_DEVICE = "tablet0"
AUDIO_BACKEND = "snd0"
SOUND_DEVICE = "sound0"
SOUND_CODEC = "sound0-codec"
VDAGENT_CHARDEV = "chr-vdagent"
VDAGENT_DEVICE = "vdagent0"
VDAGENT_PORT = "com.redhat.spice.0"
"""The virtio-serial port spice-vdagent opens in the guest."""


def channel_key(channel_name: str) -> str:
    """A short, QEMU-id-safe key of a channel (its name may be long, or start with a digit): it names the
    channel's chardev, its device and its socket file (sun_path is only 107 bytes)."""
    return hashlib.sha256(channel_name.encode()).hexdigest()[:10]


def channel_chardev(channel_name: str) -> str:
    return f"chr-ch-{channel_key(channel_name)}"


def channel_device(channel_name: str) -> str:
    return f"ch-{channel_key(channel_name)}"

# Fixed namespace of the SMBIOS UUIDs (a uuid5 of the VM name in it), so every host derives the same one.
_SMBIOS_NAMESPACE = uuid.UUID("4f1e2b6e-8a37-5c0d-9f52-1d6b0c7e3a10")


def smbios_uuid(vm_name: str) -> str:
    """The VM's SMBIOS system UUID (``-uuid``; /sys/class/dmi/id/product_uuid in the guest): derived from
    its name alone, so it is the same across restarts, upgrades and hosts, and needs no stored state."""
    return str(uuid.uuid5(_SMBIOS_NAMESPACE, vm_name))


def firmware_node(what: str) -> str:
    """The raw format node of a UEFI VM's pflash ``what``: ``code`` (pflash0, read-only) or ``vars`` (pflash1)."""
    return f"fw-{what}"


def firmware_file_node(what: str) -> str:
    return f"fwfile-{what}"


def boot_devices(spec: VirtualMachineSpec) -> list[str]:
    """The boot order as ``kind:name`` entries: ``bootOrder``, or else the disks in order."""
    return list(spec.bootOrder) or [f"disk:{disk.name}" for disk in spec.disks]


def boot_indices(spec: VirtualMachineSpec) -> dict[str, int]:
    """QEMU ``bootindex`` per ``kind:name`` device (1 first: a direct kernel boot's option ROM holds 0). During
    an install start a ``bootOnce`` CD-ROM takes 1 and the order follows from 2 (QEMU refuses a bootindex twice)."""
    first = 2 if any(cdrom.bootOnce for cdrom in spec.cdroms) else 1
    return {entry: index for index, entry in enumerate(boot_devices(spec), start=first)}
