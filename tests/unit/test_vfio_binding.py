"""Taking host devices for a VM and giving them back, against a fake sysfs tree (tests/fake_sysfs.py).

The fake tree's ``Kernel`` thread does what the kernel does on writes to ``unbind`` and ``drivers_probe``;
the assertions are on the tree's end state (drivers, device nodes) and on the recorded claims.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.adapters import sysfs
from reconciler.apply import vfio
from reconciler.errors import Refused, StepFailed
from reconciler.spec.host import HostConfig
from reconciler.state import files
from reconciler.state.layout import StateLayout
from reconciler.state.models import HostDeviceClaim
from tests.fake_sysfs import FakeHost, Kernel

GPU, AUDIO, BRIDGE = "0000:01:00.0", "0000:01:00.1", "0000:00:01.0"
ACCOUNT = (995, 995)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeHost, HostConfig, StateLayout]]:
    host = FakeHost.build(tmp_path)
    host.pci(BRIDGE, "1", "pcieport", class_code="0x060400")
    host.pci(GPU, "1", None)
    host.pci(AUDIO, "1", "snd_hda_intel", class_code="0x040300")
    host.pci("0000:02:00.0", "2", None)
    host.pci("0000:02:00.1", "2", "e1000e", class_code="0x020000", net="enp2s0f1")
    config = HostConfig(sysfsRoot=str(host.sys), devRoot=str(host.dev), pciPassthrough=[GPU, AUDIO, "0000:02:00.0",
                                                                                         "0000:02:00.1"])
    kernel = Kernel(host).start()
    yield host, config, StateLayout(tmp_path / "state")
    kernel.stop()


def test_facts_read_the_group_drivers_and_host_use(fake: tuple[FakeHost, HostConfig, StateLayout]) -> None:
    _, config, _ = fake
    facts = sysfs.observe_devices(config.sysfsRoot, config.devRoot, {GPU, "0000:02:00.0"}, with_usb=False)
    assert facts.iommu and facts.vfio_driver
    assert facts.groups == {"1": [BRIDGE, GPU, AUDIO], "2": ["0000:02:00.0", "0000:02:00.1"]}
    assert facts.pci[BRIDGE].bridge and not facts.pci[GPU].bridge
    assert facts.pci[AUDIO].driver == "snd_hda_intel" and facts.pci[GPU].driver is None
    assert facts.pci["0000:02:00.1"].host_uses == ["network interface enp2s0f1"]
    assert facts.group_nodes == {"1": None, "2": None}


def test_group_bound_to_vfio_and_given_back_to_its_drivers(fake: tuple[FakeHost, HostConfig, StateLayout]) -> None:
    host, config, layout = fake
    done = vfio.take_pci(layout, config, "desk", "gpu", GPU, [GPU, AUDIO], "1", ACCOUNT)
    assert host.driver_of(GPU) == host.driver_of(AUDIO) == "vfio-pci"
    assert host.driver_of(BRIDGE) == "pcieport"  # bridges stay with the host
    node = os.stat(host.dev / "vfio/1")
    assert (node.st_uid, node.st_gid, node.st_mode & 0o777) == (*ACCOUNT, 0o600), done
    claims = files.read_host_device_claims(layout)
    assert {k: (c.vm, c.original_driver) for k, c in claims.items()} == {GPU: ("desk", None),
                                                                          AUDIO: ("desk", "snd_hda_intel")}
    assert vfio.take_pci(layout, config, "desk", "gpu", GPU, [GPU, AUDIO], "1", ACCOUNT)  # idempotent
    assert files.read_host_device_claims(layout) == claims

    vfio.release(layout, config, "desk", [GPU, AUDIO])
    assert host.driver_of(AUDIO) == "snd_hda_intel" and host.driver_of(GPU) is None
    assert not (host.dev / "vfio/1").exists()  # the kernel drops an unbound group's node
    assert files.read_host_device_claims(layout) == {}
    assert (host.sys / "bus/pci/devices" / AUDIO / "driver_override").read_text().strip() == ""


def test_a_crash_between_claim_and_bind_is_finished_and_released_to_the_recorded_driver(
        fake: tuple[FakeHost, HostConfig, StateLayout]) -> None:
    host, config, layout = fake
    # The claim was written, then the reconciler died before unbinding: the audio function is still on its driver.
    files.write_host_device_claim(layout, AUDIO, HostDeviceClaim(vm="desk", device="gpu",
                                                                 original_driver="snd_hda_intel", group="1"))
    vfio.take_pci(layout, config, "desk", "gpu", GPU, [GPU, AUDIO], "1", ACCOUNT)
    assert host.driver_of(AUDIO) == "vfio-pci"
    assert files.read_host_device_claims(layout)[AUDIO].original_driver == "snd_hda_intel"  # not "vfio-pci"
    vfio.release(layout, config, "desk", [GPU, AUDIO])
    assert host.driver_of(AUDIO) == "snd_hda_intel"


def test_a_member_the_host_uses_is_refused_before_anything_changes(
        fake: tuple[FakeHost, HostConfig, StateLayout]) -> None:
    host, config, layout = fake
    with pytest.raises(Refused, match=r"0000:02:00.1 is bound to e1000e and in use by the host \(network interface"):
        vfio.take_pci(layout, config, "desk", "nic", "0000:02:00.0", ["0000:02:00.0", "0000:02:00.1"], "2",
                      ACCOUNT)
    assert host.driver_of("0000:02:00.1") == "e1000e"
    assert "0000:02:00.1" not in files.read_host_device_claims(layout)


def test_a_group_that_changed_since_the_plan_is_not_touched(fake: tuple[FakeHost, HostConfig, StateLayout]) -> None:
    host, config, layout = fake
    with pytest.raises(StepFailed, match=r"IOMMU group 1 is now 0000:01:00.0, 0000:01:00.1, not what was planned"):
        vfio.take_pci(layout, config, "desk", "gpu", GPU, [GPU], "1", ACCOUNT)  # a plan that missed the audio
    with pytest.raises(StepFailed, match="no longer in IOMMU group 2"):
        vfio.take_pci(layout, config, "desk", "gpu", GPU, [GPU, AUDIO], "2", ACCOUNT)
    assert host.driver_of(AUDIO) == "snd_hda_intel" and files.read_host_device_claims(layout) == {}


def test_a_device_held_by_another_vm_is_refused(fake: tuple[FakeHost, HostConfig, StateLayout]) -> None:
    _, config, layout = fake
    vfio.take_pci(layout, config, "other", "gpu", GPU, [GPU, AUDIO], "1", ACCOUNT)
    with pytest.raises(Refused, match="held by VM other"):
        vfio.take_pci(layout, config, "desk", "gpu", GPU, [GPU, AUDIO], "1", ACCOUNT)
    assert {c.vm for c in files.read_host_device_claims(layout).values()} == {"other"}


def test_usb_node_given_to_qemu_and_restored(fake: tuple[FakeHost, HostConfig, StateLayout]) -> None:
    host, config, layout = fake
    node = host.usb(1, "2", 4, "1050", "0407")
    found = sysfs.usb_devices(config.sysfsRoot, config.devRoot)
    assert [(d.key, d.vendor, d.product, d.node) for d in found] == [("usb:1-2", "0x1050", "0x0407", str(node))]
    vfio.take_usb(layout, config, "desk", "token", "usb:1-2", ACCOUNT)
    assert (os.stat(node).st_uid, os.stat(node).st_mode & 0o777) == (ACCOUNT[0], 0o600)
    vfio.release(layout, config, "desk", ["usb:1-2"])
    assert (os.stat(node).st_uid, os.stat(node).st_mode & 0o777) == (0, 0o664)
    assert files.read_host_device_claims(layout) == {}
