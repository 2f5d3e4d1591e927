"""spec.hostDevices: strict validation (addresses, ids, no injection), the QEMU options at start and the
device_add arguments of a hot-plug (golden), and the QMP commands the hot-plug sends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.qemu.argv import build_argv
from reconciler.qemu.hostdev import usb_host_args, vfio_pci_args, xhci_args
from reconciler.spec.loader import load_text
from reconciler.spec.models import VirtualMachine
from reconciler.state.layout import StateLayout

HEAD = """apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {name: desk}
spec:
  machine: {type: q35, accel: [tcg]}
  hotplugSlots: 1
  boot: {kernel: /srv/k}
"""


def _load(devices: str, head: str = HEAD) -> tuple[VirtualMachine | None, list[str]]:
    objects, errors = load_text(head + f"  hostDevices: {devices}\n", "vm.yaml")
    vm = objects[0][0] if objects else None
    return (vm if isinstance(vm, VirtualMachine) else None), [str(e) for e in errors]


def _vm(devices: str) -> VirtualMachine:
    vm, errors = _load(devices)
    assert vm is not None, errors
    return vm


def _devices(argv: list[str]) -> list[dict[str, object]]:
    return [json.loads(argv[i + 1]) for i, arg in enumerate(argv[:-1]) if arg == "-device"]


def test_pci_on_its_own_root_port_usb_on_xhci_golden() -> None:
    vm = _vm('[{name: gpu, pci: "0000:01:00.0", romFile: /usr/share/qemu/gpu.rom, multifunction: true}, '
             '{name: gpu-audio, pci: "0000:01:00.1"}, {name: token, usb: {vendor: "0x1050", product: "0407"}}, '
             '{name: stick, usb: {bus: 3, port: "1.4"}}, {name: hub, usb: {bus: 2, address: 7}}]')
    argv = build_argv(vm.name, vm.spec, StateLayout(Path("/var/lib/infz")).vm("desk"))
    devices = _devices(argv)
    ours = [d for d in devices if str(d.get("id", "")).startswith(("rp-hostdev", "hostdev-", "xhci", "hp-"))]
    assert ours == [
        {"driver": "pcie-root-port", "id": "rp-hostdev-gpu", "chassis": 1, "bus": "pcie.0"},
        {"driver": "vfio-pci", "host": "0000:01:00.0", "id": "hostdev-gpu", "bus": "rp-hostdev-gpu",
         "romfile": "/usr/share/qemu/gpu.rom", "multifunction": "on"},
        {"driver": "pcie-root-port", "id": "rp-hostdev-gpu-audio", "chassis": 2, "bus": "pcie.0"},
        {"driver": "vfio-pci", "host": "0000:01:00.1", "id": "hostdev-gpu-audio", "bus": "rp-hostdev-gpu-audio"},
        {"driver": "pcie-root-port", "id": "hp-0", "chassis": 3, "bus": "pcie.0"},
        {"driver": "qemu-xhci", "id": "xhci0"},
        {"driver": "usb-host", "id": "hostdev-token", "bus": "xhci0.0", "vendorid": 0x1050, "productid": 0x0407},
        {"driver": "usb-host", "id": "hostdev-stick", "bus": "xhci0.0", "hostbus": 3, "hostport": "1.4"},
        {"driver": "usb-host", "id": "hostdev-hub", "bus": "xhci0.0", "hostbus": 2, "hostaddr": 7},
    ]


def test_no_host_device_no_usb_controller() -> None:
    vm = _vm("[]")
    argv = build_argv(vm.name, vm.spec, StateLayout(Path("/var/lib/infz")).vm("desk"))
    assert not [d for d in _devices(argv) if d["driver"] in ("qemu-xhci", "vfio-pci", "usb-host")]


def test_hotplug_device_add_arguments_golden() -> None:
    """What apply/hostdev_plug.py sends as QMP device_add: the same dictionaries as at start, on a spare port."""
    vm = _vm('[{name: gpu, pci: "0000:0a:1f.7", romFile: /srv/r.rom}, {name: token, usb: {vendor: "0x1050", '
             'product: "0x0407"}}]')
    gpu, token = vm.spec.hostDevices
    assert {"execute": "device_add", "arguments": vfio_pci_args(gpu, "hp-0")} == {
        "execute": "device_add", "arguments": {"driver": "vfio-pci", "host": "0000:0a:1f.7", "id": "hostdev-gpu",
                                               "bus": "hp-0", "romfile": "/srv/r.rom"}}
    assert usb_host_args(token) == {"driver": "usb-host", "id": "hostdev-token", "bus": "xhci0.0",
                                    "vendorid": 4176, "productid": 1031}
    assert xhci_args() == {"driver": "qemu-xhci", "id": "xhci0"}


@pytest.mark.parametrize(("devices", "error"), [
    ('[{name: g, pci: "01:00.0"}]', "expected a PCI address like 0000:01:00.0"),
    ('[{name: g, pci: "0000:01:00.8"}]', "expected a PCI address"),
    ('[{name: g, pci: "0000:01:20.0"}]', "expected a PCI address"),
    ('[{name: g, pci: "0000:01:00.0,romfile=/etc/shadow"}]', "expected a PCI address"),
    ('[{name: g, pci: "0000:01:00.0\\n"}]', "expected a PCI address"),
    ('[{name: g, pci: "0000:01:00.0", romFile: "/x.rom,id=y"}]', "must be an absolute path of letters"),
    ('[{name: g, pci: "0000:01:00.0", romFile: "rel.rom"}]', "must be an absolute path"),
    ('[{name: g, pci: "0000:01:00.0", romFile: "/a/../etc/x"}]', "no '..'"),
    ('[{name: t, usb: {vendor: "0x1050,x=1", product: "0x0407"}}]', "expected a 16-bit hex id"),
    ('[{name: t, usb: {vendor: "0x10500", product: "0x0407"}}]', "expected a 16-bit hex id"),
    ('[{name: t, usb: {vendor: "0x1050"}}]', "vendor and product go together"),
    ('[{name: t, usb: {vendor: "0x1050", product: "0x0407", bus: 1}}]', "either vendor + product"),
    ('[{name: t, usb: {bus: 1}}]', "bus goes with exactly one of port or address"),
    ('[{name: t, usb: {bus: 1, port: "1,2"}}]', "expected a USB port path"),
    ('[{name: t, usb: {bus: 1, port: "1", address: 3}}]', "bus goes with exactly one of port or address"),
    ('[{name: t, usb: {bus: 1, port: "1"}, pci: "0000:01:00.0"}]', "either pci or usb"),
    ('[{name: t}]', "either pci or usb"),
    ('[{name: t, usb: {bus: 1, port: "1"}, multifunction: true}]', "romFile and multifunction are for PCI"),
    ('[{name: g, pci: "0000:01:00.0"}, {name: g, pci: "0000:01:00.1"}]', "the name 'g' is used twice"),
    ('[{name: g, pci: "0000:01:00.0"}, {name: h, pci: "0000:01:00.0"}]', "0000:01:00.0 is listed twice"),
    ('[{name: "G,x", pci: "0000:01:00.0"}]', "should match pattern"),
])
def test_values_are_validated_strictly(devices: str, error: str) -> None:
    vm, errors = _load(devices)
    assert vm is None and any(error in e for e in errors), errors
    assert all("vm.yaml:" in e for e in errors)  # located: file:line:col


def test_pci_needs_q35_and_addresses_are_canonical() -> None:
    _, errors = _load('[{name: g, pci: "0000:01:00.0"}]', HEAD.replace("q35", "pc"))
    assert any("PCI hostDevices need machine type q35" in e for e in errors), errors
    vm = _vm('[{name: g, pci: "0000:0A:00.0"}, {name: t, usb: {vendor: "1D6B", product: "0x0002"}}]')
    assert vm.spec.hostDevices[0].pci == "0000:0a:00.0"
    usb = vm.spec.hostDevices[1].usb
    assert usb is not None and (usb.vendor, usb.product) == ("0x1d6b", "0x0002")


def test_qemu_with_a_pci_device_may_lock_all_guest_memory() -> None:
    """VFIO pins guest memory for DMA: QEMU is launched (prlimit, before setpriv) with memlock = memory + 1 GiB."""
    from reconciler.apply.vmprocess import memlock_limit

    assert memlock_limit(_vm('[{name: t, usb: {vendor: "0x1050", product: "0x0407"}}]')) is None
    assert memlock_limit(_vm('[{name: g, pci: "0000:01:00.0"}]')) == 512 * 1024**2 + 1024**3  # default 512Mi
