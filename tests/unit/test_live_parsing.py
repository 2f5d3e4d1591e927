"""Pure parsing of QMP answers used by the live observer (shapes recorded from QEMU 7.2)."""

from __future__ import annotations

import pytest

from reconciler.adapters.monitor import free_spare_ports
from reconciler.observe.live import _NETDEV_LINE, _cd_from_fdset, base_memory, may_have_memory_devices

QUERY_PCI = [{"bus": 0, "devices": [
    {"qdev_id": "rp-disk-root", "slot": 1, "pci_bridge": {"bus": {}, "devices": [{"qdev_id": "disk-root"}]}},
    {"qdev_id": "hp-0", "slot": 3, "pci_bridge": {"bus": {}, "devices": [{"qdev_id": "disk-data"}]}},
    {"qdev_id": "hp-1", "slot": 4, "pci_bridge": {"bus": {}, "devices": []}},
    {"qdev_id": "hp-10", "slot": 5, "pci_bridge": {"bus": {}, "devices": []}},
    {"qdev_id": "hp-2", "slot": 6, "pci_bridge": {"bus": {}, "devices": []}},
    {"qdev_id": "scsi0", "slot": 7},
]}]


def test_free_spare_ports_skips_occupied_and_sorts_numerically() -> None:
    assert free_spare_ports(QUERY_PCI) == ["hp-1", "hp-2", "hp-10"]


def test_netdevs_are_read_from_info_network() -> None:
    text = ("nic-nat: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n"
            " \\ net-nat: index=0,type=user,net=10.0.2.0,restrict=off\r\n"
            "net-orphan: index=0,type=user,net=10.0.2.0,restrict=off\r\n")
    assert _NETDEV_LINE.findall(text) == ["net-nat", "net-orphan"]


@pytest.mark.parametrize(("cmdline", "expected"), [
    (["qemu-system-x86_64", "-m", "size=256M"], 256 * 2**20),
    (["qemu-system-x86_64", "-smp", "1", "-m", "size=2048M,slots=4,maxmem=8192M"], 2 * 2**30),
    (["qemu-system-x86_64", "-m", "1G"], 2**30),
    (["qemu-system-x86_64", "-m", "512"], None),  # MiB to QEMU: not guessed, asked
    (["qemu-system-x86_64", "-m", "slots=2"], None),
    (["qemu-system-x86_64", "-m"], None),
    (["qemu-system-x86_64"], None),
    (None, None),
])
def test_base_memory_is_the_command_lines_or_unknown(cmdline: list[str] | None, expected: int | None) -> None:
    """What ``query-memory-size-summary`` would call base-memory (it is then not asked)."""
    assert base_memory(cmdline) == expected


def test_memory_devices_are_asked_about_only_when_device_memory_was_reserved() -> None:
    assert not may_have_memory_devices(["qemu-system-x86_64", "-m", "size=256M"])
    assert may_have_memory_devices(["qemu-system-x86_64", "-m", "size=256M,slots=4,maxmem=1024M"])
    assert may_have_memory_devices(None), "an unknown command line is asked"
    assert may_have_memory_devices(["qemu-system-x86_64"]), "no -m: asked, not guessed"


def test_the_fd_sets_are_asked_for_only_when_a_cd_medium_came_from_one() -> None:
    disk = {"qdev": "/machine/peripheral/disk-root/virtio-backend", "inserted": {"file": "/dev/fdset/1"}}
    empty_cd = {"qdev": "cd-install", "locked": False}
    assert not _cd_from_fdset([disk, empty_cd]), "a disk's fd set names nothing the plan reads"
    assert _cd_from_fdset([disk, {"qdev": "cd-install", "inserted": {"file": "/dev/fdset/3"}}])
    assert not _cd_from_fdset([{"qdev": "cd-install", "inserted": {"file": "/srv/iso/debian.iso"}}])
