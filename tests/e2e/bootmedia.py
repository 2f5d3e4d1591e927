"""Real boot media for the install proof, built from Debian packages (no root, no loop devices):

- ``disk_image``: a FAT file system holding the test guest's kernel and initramfs with SYSLINUX installed in
  its boot sector (``mkfs.vfat`` from dosfstools, ``syslinux --install`` through mtools), so a BIOS boots it
  from a hard disk; its kernel command line says ``infz.boot=disk``.
- ``install_iso``: an El Torito ISO 9660 CD (pycdlib, ISOLINUX from the isolinux package, with a boot info
  table) that boots the same kernel with ``infz.boot=cd infz.install=disk.img`` and carries that disk image:
  the guest's "installer" copies it onto the VM's first virtio disk and powers off (scripts/build-guest.sh).

So the disk the VM boots after its install is the one its install wrote, not one the test put there.
Used by tests/e2e/test_install_boot.py.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pycdlib

ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
BASE_CMDLINE = "console=ttyS0 panic=-1"
DISK_IMAGE_MIB = 24  # the guest's kernel (~14 MiB) and initramfs, with room for FAT


def _loader_config(cmdline: str) -> bytes:
    # No prompt and no timeout: the entry boots at once (there is no keyboard on a test VM anyway).
    return (f"DEFAULT infz\nPROMPT 0\nTIMEOUT 0\nSERIAL 0 115200\nLABEL infz\n  KERNEL /vmlinuz\n"
            f"  INITRD /initrd.img\n  APPEND {cmdline}\n").encode()


def disk_image(guest_dir: Path, out: Path) -> Path:
    """A SYSLINUX-bootable FAT disk image (a "superfloppy": the file system starts at sector 0)."""
    out.unlink(missing_ok=True)
    subprocess.run(["mkfs.vfat", "-C", "-n", "INFZ_DISK", str(out), str(DISK_IMAGE_MIB * 1024)],
                   check=True, capture_output=True)
    config = out.with_suffix(".cfg")
    config.write_bytes(_loader_config(f"{BASE_CMDLINE} infz.boot=disk"))
    for source, name in ((guest_dir / "vmlinuz", "vmlinuz"), (guest_dir / "initrd.img", "initrd.img"),
                         (config, "syslinux.cfg")):
        subprocess.run(["mcopy", "-o", "-i", str(out), str(source), f"::{name}"], check=True, capture_output=True)
    config.unlink()
    subprocess.run(["syslinux", "--install", str(out)], check=True, capture_output=True)
    return out


def install_iso(guest_dir: Path, disk: Path, out: Path, label: str = "INFZ_INSTALL") -> Path:
    """An ISOLINUX-bootable install CD carrying ``disk`` as /disk.img."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=label, rock_ridge="1.09")
    iso.add_directory("/ISOLINUX", rr_name="isolinux")
    files = [
        (ISOLINUX_BIN.read_bytes(), "/ISOLINUX/ISOLINUX.BIN;1", "isolinux.bin"),
        (LDLINUX_C32.read_bytes(), "/ISOLINUX/LDLINUX.C32;1", "ldlinux.c32"),
        (_loader_config(f"{BASE_CMDLINE} infz.boot=cd infz.install=disk.img"), "/ISOLINUX/ISOLINUX.CFG;1",
         "isolinux.cfg"),
    ]
    for data, iso_path, rr_name in files:
        iso.add_fp(io.BytesIO(data), len(data), iso_path, rr_name=rr_name)
    # The big files are streamed from disk, not read into memory.
    for source, iso_path, rr_name in ((guest_dir / "vmlinuz", "/VMLINUZ.;1", "vmlinuz"),
                                      (guest_dir / "initrd.img", "/INITRD.IMG;1", "initrd.img"),
                                      (disk, "/DISK.IMG;1", "disk.img")):
        iso.add_file(str(source), iso_path, rr_name=rr_name)
    # A boot info table: ISOLINUX finds itself on the CD through it (as mkisofs -boot-info-table).
    iso.add_eltorito("/ISOLINUX/ISOLINUX.BIN;1", bootcatfile="/ISOLINUX/BOOT.CAT;1", boot_load_size=4,
                     boot_info_table=True)
    out.unlink(missing_ok=True)
    iso.write(str(out))
    iso.close()
    return out
