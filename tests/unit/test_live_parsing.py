"""Pure parsing of QMP answers used by the live observer (shapes recorded from QEMU 7.2)."""

from __future__ import annotations

from reconciler.adapters.monitor import free_spare_ports
from reconciler.observe.live import _NETDEV_LINE

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
