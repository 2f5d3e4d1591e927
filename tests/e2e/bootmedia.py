"""Real boot media for the install proof, built from Debian packages (no root, no loop devices):

- ``disk_image``: a FAT file system holding the test guest's kernel and initramfs with SYSLINUX installed in
  its boot sector (``mkfs.vfat`` from dosfstools, ``syslinux --install`` through mtools) and a standalone GRUB
  (``grub-mkimage`` from grub-efi-amd64-bin) as its removable-media EFI loader, so BIOS and UEFI boot it from
  a hard disk; its kernel command line says ``infz.boot=disk``.
- ``install_iso``: an El Torito ISO 9660 CD (pycdlib) with two boot entries, ISOLINUX for BIOS (with a boot
  info table) and a small FAT image with GRUB for UEFI, that boot the same kernel with
  ``infz.boot=cd infz.install=disk.img`` and carry that disk image:
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
# GRUB's EFI modules, in its image: file systems, the kernel loader, search and the serial console.
GRUB_MODULES = ["part_gpt", "part_msdos", "fat", "iso9660", "linux", "normal", "search", "search_fs_file",
                "serial", "terminal", "echo", "boot", "configfile"]
BASE_CMDLINE = "console=ttyS0 panic=-1"
DISK_IMAGE_MIB = 24  # the guest's kernel (~14 MiB) and initramfs, with room for FAT


def _loader_config(cmdline: str) -> bytes:
    # No prompt and no timeout: the entry boots at once (there is no keyboard on a test VM anyway).
    return (f"DEFAULT infz\nPROMPT 0\nTIMEOUT 0\nSERIAL 0 115200\nLABEL infz\n  KERNEL /vmlinuz\n"
            f"  INITRD /initrd.img\n  APPEND {cmdline}\n").encode()


def _grub_efi(out: Path, marker: str, cmdline: str) -> Path:
    """A standalone GRUB EFI loader (grub-efi-amd64-bin) whose built-in configuration boots the guest's kernel
    from the device that holds the file ``/marker`` (the CD's ISO 9660 root, or the installed disk)."""
    config = out.with_suffix(".grub.cfg")
    config.write_text("serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\n"
                      f"search --no-floppy --file /{marker} --set=root\nlinux /vmlinuz {cmdline}\n"
                      "initrd /initrd.img\nboot\n")
    subprocess.run(["grub-mkimage", "-O", "x86_64-efi", "-o", str(out), "-c", str(config), "-p", "/EFI/BOOT",
                    *GRUB_MODULES], check=True, capture_output=True)
    config.unlink()
    return out


def _fat(out: Path, mib: int, label: str, content: list[tuple[Path, str]]) -> Path:
    out.unlink(missing_ok=True)
    subprocess.run(["mkfs.vfat", "-C", "-n", label, str(out), str(mib * 1024)], check=True, capture_output=True)
    subprocess.run(["mmd", "-i", str(out), "::/EFI", "::/EFI/BOOT"], check=True, capture_output=True)
    for source, name in content:
        subprocess.run(["mcopy", "-o", "-i", str(out), str(source), f"::/{name}"], check=True, capture_output=True)
    return out


def disk_image(guest_dir: Path, out: Path) -> Path:
    """The disk an install writes, booting the guest with ``infz.boot=disk`` under BIOS or UEFI: a FAT file
    system (a "superfloppy": no partition table) with SYSLINUX in its boot sector (/syslinux.cfg) and GRUB as
    its removable-media EFI loader (/EFI/BOOT/BOOTX64.EFI; OVMF mounts a whole-disk FAT)."""
    cmdline = f"{BASE_CMDLINE} infz.boot=disk"
    config, marker = out.with_suffix(".cfg"), out.with_suffix(".marker")
    config.write_bytes(_loader_config(cmdline))
    marker.write_text("installed\n")
    grub = _grub_efi(out.with_suffix(".efi"), "infz-boot-disk", cmdline)
    _fat(out, DISK_IMAGE_MIB, "INFZ_DISK", [
        (guest_dir / "vmlinuz", "vmlinuz"), (guest_dir / "initrd.img", "initrd.img"), (config, "syslinux.cfg"),
        (marker, "infz-boot-disk"), (grub, "EFI/BOOT/BOOTX64.EFI")])
    for scratch in (config, marker, grub):
        scratch.unlink()
    subprocess.run(["syslinux", "--install", str(out)], check=True, capture_output=True)
    return out


def install_iso(guest_dir: Path, disk: Path, out: Path, label: str = "INFZ_INSTALL") -> Path:
    """An ISOLINUX-bootable install CD carrying ``disk`` as /disk.img."""
    cmdline = f"{BASE_CMDLINE} infz.boot=cd infz.install=disk.img"
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=label, rock_ridge="1.09")
    iso.add_directory("/ISOLINUX", rr_name="isolinux")
    files = [
        (ISOLINUX_BIN.read_bytes(), "/ISOLINUX/ISOLINUX.BIN;1", "isolinux.bin"),
        (LDLINUX_C32.read_bytes(), "/ISOLINUX/LDLINUX.C32;1", "ldlinux.c32"),
        (_loader_config(cmdline), "/ISOLINUX/ISOLINUX.CFG;1", "isolinux.cfg"),
        (b"install CD\n", "/INFZBTCD.;1", "infz-boot-cd"),  # GRUB finds the CD by it
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
    # UEFI: a second El Torito entry (platform 0xEF) whose image is a small FAT with GRUB as the EFI loader.
    grub = _grub_efi(out.with_name(out.name + ".efi"), "infz-boot-cd", cmdline)
    efi_image = _fat(out.with_name(out.name + ".efiboot.img"), 2, "INFZ_EFI", [(grub, "EFI/BOOT/BOOTX64.EFI")])
    grub.unlink()
    iso.add_file(str(efi_image), "/EFIBOOT.IMG;1", rr_name="efiboot.img")
    iso.add_eltorito("/EFIBOOT.IMG;1", efi=True, platform_id=0xEF, boot_load_size=efi_image.stat().st_size // 512)
    out.unlink(missing_ok=True)
    iso.write(str(out))
    iso.close()
    efi_image.unlink()
    return out
