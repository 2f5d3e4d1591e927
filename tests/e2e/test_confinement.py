"""The host policy on real files: a manifest that names host files outside the storage roots, a symlink
out of a root, another VM's disk or a device node is refused at `plan` with the reason, and `apply`
starts nothing and creates nothing for it, while the VM that was already there goes on untouched."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.e2e.harness import GUEST_DIR, Host, live_processes, vm_manifest

KERNEL = f"{GUEST_DIR}/vmlinuz"


def _evil(name: str, *, disks: str = "    - {name: root, size: 16Mi}", cdroms: str = "",
          kernel: str = KERNEL) -> str:
    text = vm_manifest(name, disks=disks, extra=f"  cdroms:\n{cdroms}" if cdroms else "")
    return text.replace(f"kernel: {KERNEL}", f"kernel: {kernel}")


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime, but the run locks (apply takes them) and the
    serial logs (the good guest writes on)."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if not p.name.endswith(".log") and p.name not in ("lock", "daemon.lock")}


def test_hostile_paths_are_refused_at_plan_and_start_nothing(host: Host) -> None:
    host.write("good.yaml", vm_manifest("good"))
    host.apply()
    (good_pid,) = host.qemu_pids("good")
    host.guest("good").wait_report(lambda r: "vda" in r.disks, what="boot")

    images = host.base / "images"  # inside this host's storage root (its temp dir)
    images.mkdir()
    (images / "passwd.img").symlink_to("/etc/passwd")  # a symlink in a root that leads into /etc
    (images / "zero.iso").symlink_to("/dev/zero")  # a symlink to a device node
    os.mknod(images / "null.img", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a device node in a root
    other_disk = host.disk("good", "root")  # another VM's disk, by its path under the state directory
    hostile = {
        "evil-disk": (_evil("evil-disk", disks="    - {name: s, image: /etc/shadow, imageFormat: raw}"),
                      "spec.disks[s].image: /etc/shadow resolves to /etc/shadow, outside the storage roots"),
        "evil-cd": (_evil("evil-cd", cdroms="    - {name: c, image: /etc/shadow}"),
                    "spec.cdroms[c].image: /etc/shadow resolves to /etc/shadow, outside the storage roots"),
        "evil-kernel": (_evil("evil-kernel", kernel="/etc/shadow"),
                        "spec.boot.kernel: /etc/shadow resolves to /etc/shadow, outside the storage roots"),
        "evil-link": (_evil("evil-link", disks=f"    - {{name: s, image: {images}/passwd.img, imageFormat: raw}}"),
                      f"spec.disks[s].image: {images}/passwd.img resolves to /etc/passwd, outside the storage"),
        "evil-steal": (_evil("evil-steal", disks=f"    - {{name: s, image: {other_disk}}}"),
                       f"spec.disks[s].image: {other_disk} resolves to {other_disk}, in the state directory"),
        "evil-zero": (_evil("evil-zero", cdroms=f"    - {{name: c, image: {images}/zero.iso}}"),
                      f"spec.cdroms[c].image: {images}/zero.iso resolves to /dev/zero, outside the storage roots"),
        "evil-node": (_evil("evil-node", disks=f"    - {{name: s, image: {images}/null.img, imageFormat: raw}}"),
                      f"spec.disks[s].image: {images}/null.img resolves to {images}/null.img, a device node, "
                      "not a regular file"),
    }
    for name, (text, _) in hostile.items():
        host.write(f"{name}.yaml", text)
    before = _tree(host.state)

    planned = host.cli("plan", str(host.manifests))
    assert planned.returncode == 1, planned.stdout + planned.stderr
    for name, (_, reason) in hostile.items():
        assert f"x VirtualMachine {name} cannot be changed" in planned.stdout
        assert reason in planned.stdout, (name, planned.stdout)
    assert "storage roots: " in planned.stdout

    applied = host.cli("apply", str(host.manifests), "--yes")
    assert applied.returncode != 0
    for name in hostile:
        assert host.qemu_pids(name) == []
        assert not (host.state / "vms" / name).exists() and not (host.state / "disks" / name).exists()
    assert live_processes(lambda cmdline: b"/etc/shadow" in cmdline) == []
    assert _tree(host.state) == before, "nothing under the state directory may change"
    assert host.qemu_pids("good") == [good_pid]
