"""A live grow reads the disk's size from its QEMU's answer (no qemu-img on the way): the parser of it."""

from __future__ import annotations

from reconciler.apply.disks import live_size

NODES = [{"node-name": "f-root", "image": {"virtual-size": 70000000}},
         {"node-name": "disk-root", "image": {"virtual-size": 68157440}}]


def test_the_size_of_the_named_node() -> None:
    assert live_size(NODES, "disk-root") == 68157440
    assert live_size(NODES, "disk-data") is None, "not there: the caller asks qemu-img"
    assert live_size({"error": "x"}, "disk-root") is None
    assert live_size([{"node-name": "disk-root", "image": {}}], "disk-root") is None
