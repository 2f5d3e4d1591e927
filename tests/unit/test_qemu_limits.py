"""QEMU's and qemu-img's limits are validation errors, located, before anything is applied.

The boundaries were measured with this project's QEMU 7.2 (see ``reconciler.spec.limits``): the last
value QEMU accepted passes here, the first it refused fails here.
"""

from __future__ import annotations

import pytest

from reconciler.spec import limits
from reconciler.spec.loader import load_text

HEAD = "apiVersion: infinization.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: a}\nspec:\n"


def errors(spec: str) -> list[str]:
    return [str(e) for e in load_text(HEAD + spec, "f.yaml")[1]]


@pytest.mark.parametrize(("spec", "where", "what"), [
    ("  disks: [{name: d, size: 1024Pi}]\n", "f.yaml:5:11: spec.disks[0]", "over 2Pi"),
    ("  disks: [{name: d, size: 4Pi}]\n", "f.yaml:5:11: spec.disks[0]", "over 2Pi"),
    ("  disks: [{name: d, size: 16383Pi}]\n", "f.yaml:5:27: spec.disks[0].size", "signed 64-bit"),
    ("  disks: [{name: d, size: 1Gi, iops: 2000000000000000}]\n", "spec.disks[0].iops", "less than or equal"),
    ("  disks: [{name: d, size: 1Gi, bps: 2000000000000000}]\n", "spec.disks[0].bps", "less than or equal"),
    ("  memory: {size: 1Ti}\n", "f.yaml:5:11: spec.memory", "40 physical address bits"),
    ("  memory: {size: 1Gi, maxSize: 971Gi}\n", "spec.memory", "up to 1012Gi"),
    ("  cpu: {sockets: 2, cores: 128}\n", "f.yaml:5:8: spec.cpu", "need APIC ID 255"),
    ("  cpu: {cores: 1, maxCpus: 512}\n", "spec.cpu", "APIC ID"),
    ("  cpu: {sockets: 3, cores: 65}\n", "spec.cpu", "need APIC ID 320"),
])
def test_values_qemu_refuses_are_validation_errors(spec: str, where: str, what: str) -> None:
    found = errors(spec)
    assert len(found) == 1 and where in found[0] and what in found[0], found


@pytest.mark.parametrize("spec", [
    "  disks: [{name: d, size: 2Pi, iops: 1000000000000000, bps: 1000000000000000}]\n",
    "  memory: {size: 1Gi, maxSize: 968Gi}\n",  # QEMU 7.2 on q35 and pc: starts
    "  cpu: {sockets: 2, cores: 127}\n",
    "  cpu: {sockets: 2, cores: 64, threads: 1, maxCpus: 254}\n",
])
def test_the_last_values_qemu_accepts_pass(spec: str) -> None:
    assert errors(spec) == []


def test_apic_ids_follow_qemus_packing() -> None:
    assert limits.highest_apic_id(1, 255, 1) == 254
    assert limits.highest_apic_id(3, 65, 1) == (2 << 7) | 64
    assert limits.highest_apic_id(2, 3, 2) == (1 << 3) | (2 << 1) | 1


def _disks(count: int, bus: str = "virtio") -> str:
    return "  disks:\n" + "".join(f"    - {{name: d{i}, size: 1Gi, bus: {bus}}}\n" for i in range(count))


def test_256_disks_are_refused_with_the_slot_count() -> None:
    found = errors(_disks(256))
    assert len(found) == 1 and found[0].startswith("f.yaml:5:3: spec: the devices need 262 PCI slots (256 virtio")
    assert "machine has 30 (use bus scsi for more disks)" in found[0]


def test_slots_count_the_controllers_and_spare_ports() -> None:
    # 23 disks + the scsi controller + the RNG + 4 spare ports (the defaults) = 29; one NIC makes 30.
    assert errors(_disks(23) + "  networks: [{name: n, type: user}]\n") == []
    assert "need 31 PCI slots" in errors(_disks(24) + "  networks: [{name: n, type: user}]\n")[0]
    assert errors(_disks(256, "scsi")) == []
    assert "virtio-scsi controller has 256 targets" in errors(_disks(256, "scsi") + "  cdroms: [{name: c}]\n")[0]
