"""Host device passthrough through the real CLI, against a fake sysfs (these machines have no IOMMU).

The host policy points ``sysfsRoot``/``devRoot`` at a tree the test builds (tests/fake_sysfs.py), whose
``Kernel`` thread does what the kernel does on writes to ``unbind`` and ``drivers_probe``. What is proven:
``plan`` refuses a group with a member the host uses and a device another VM holds, naming the member and
the VM; ``apply`` binds a complete group to vfio-pci (drivers recorded first), gives /dev/vfio/GROUP and
the USB node to QEMU's user, and hands the devices to a real QEMU (which, with no real IOMMU group, says so);
once the devices leave the manifest, ``apply`` gives every member back to its own driver, restores the
nodes, forgets the claims, and the VM boots without them (the guest reports).

A real USB passthrough is not proven here: the machine has no USB device to give (and none may be faked).
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Host, vm_manifest
from tests.fake_sysfs import FakeHost, Kernel

GPU, AUDIO, BRIDGE = "0000:01:00.0", "0000:01:00.1", "0000:00:01.0"
NIC, NIC_PORT = "0000:02:00.0", "0000:02:00.1"
DEVICES = f"""  hostDevices:
    - {{name: gpu, pci: "{GPU}", romFile: ROM, multifunction: true}}
    - {{name: gpu-audio, pci: "{AUDIO}"}}
    - {{name: token, usb: {{vendor: "0x1050", product: "0x0407"}}}}
"""


@pytest.fixture
def fake(host: Host) -> Iterator[tuple[FakeHost, Kernel]]:
    hw = FakeHost.build(host.base / "hw")
    hw.pci(BRIDGE, "1", "pcieport", class_code="0x060400")
    hw.pci(GPU, "1", "nouveau")
    hw.pci(AUDIO, "1", "snd_hda_intel", class_code="0x040300")
    hw.pci(NIC, "2", None, class_code="0x020000")
    hw.pci(NIC_PORT, "2", "e1000e", class_code="0x020000", net="enp2s0f1")
    hw.usb(1, "2", 4, "1050", "0407")
    with host.config.open("a") as config:
        config.write(f"sysfsRoot: {hw.sys}\ndevRoot: {hw.dev}\n"
                     f"pciPassthrough: ['{GPU}', '{AUDIO}', '{NIC}', '{NIC_PORT}']\nusbPassthrough: ['1050:0407']\n"
                     "vfioUnbindDrivers: [nouveau, snd_hda_intel]\n")
    kernel = Kernel(hw).start()
    yield hw, kernel
    kernel.stop()


def _owner(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_uid, info.st_mode & 0o777


def test_groups_checked_bound_to_vfio_and_given_back(host: Host, fake: tuple[FakeHost, Kernel]) -> None:
    hw, kernel = fake
    rom = host.base / "roms" / "gpu.rom"
    rom.parent.mkdir()
    rom.write_bytes(b"\x55\xaa" + bytes(510))
    qemu_uid = pwd.getpwnam("infinization-qemu").pw_uid
    desk = vm_manifest("desk", extra=DEVICES.replace("ROM", str(rom)))
    host.write("desk.yaml", desk)
    host.write("nicvm.yaml", vm_manifest("nicvm", extra=f'  hostDevices: [{{name: nic, pci: "{NIC}"}}]\n'))

    # plan: a group with a member the host uses is refused, naming it; the complete group passes.
    plan = host.cli("plan", str(host.manifests))
    assert plan.returncode == 1, plan.stdout + plan.stderr
    assert (f"refused: spec.hostDevices[nic] (PCI {NIC}): IOMMU group member {NIC_PORT} is bound to e1000e and in "
            "use by the host (network interface enp2s0f1)") in plan.stdout
    assert f"bind {GPU} with its IOMMU group's {AUDIO} to vfio-pci" in plan.stdout, plan.stdout
    assert "desk cannot be changed" not in plan.stdout

    # apply: the group is bound (the bridge stays), nodes go to QEMU's user, QEMU gets the devices.
    done = host.apply(check=False)
    assert hw.driver_of(GPU) == hw.driver_of(AUDIO) == "vfio-pci", done.stdout + done.stderr + str(kernel.log)
    assert hw.driver_of(BRIDGE) == "pcieport" and hw.driver_of(NIC_PORT) == "e1000e"
    assert _owner(hw.dev / "vfio/1") == (qemu_uid, 0o600)
    assert _owner(hw.dev / "bus/usb/001/004") == (qemu_uid, 0o600)
    claims = json.loads((host.state / "hostdevs.json").read_text())["claims"]
    assert {key: (c["vm"], c["original_driver"]) for key, c in claims.items()} == {
        GPU: ("desk", "nouveau"), AUDIO: ("desk", "snd_hda_intel"), "usb:1-2": ("desk", None)}
    # A real QEMU was handed the device and (no IOMMU group in the real /sys) refused to start with it.
    assert done.returncode != 0 and GPU in done.stdout + done.stderr, done.stdout + done.stderr
    launch = json.loads((host.state / "vms/desk/launch.json").read_text())
    assert any(f'"host":"{GPU}"' in arg and '"multifunction":"on"' in arg and str(rom) in arg
               for arg in launch["argv"]), launch["argv"]

    status = {row["name"]: row for row in json.loads(host.cli("status", "--json", check=True).stdout)["vms"]}
    assert status["desk"]["hostDevices"] == {
        GPU: {"device": "gpu", "originalDriver": "nouveau", "iommuGroup": "1"},
        AUDIO: {"device": "gpu", "originalDriver": "snd_hda_intel", "iommuGroup": "1"},
        "usb:1-2": {"device": "token", "originalDriver": None, "iommuGroup": None}}

    # Another VM asking for a member the desk holds is refused, naming the desk; the holder is not.
    host.write("thief.yaml", vm_manifest("thief", extra=f'  hostDevices: [{{name: audio, pci: "{AUDIO}"}}]\n'))
    plan = host.cli("plan", str(host.manifests))
    assert (f"refused: spec.hostDevices[audio] (PCI {AUDIO}): IOMMU group member {GPU} and the device are held by "
            "VM desk (its hostDevices[gpu])") in plan.stdout, plan.stdout
    assert "desk cannot be changed" not in plan.stdout, plan.stdout
    # Halted, the desk gives the group back (planned; the thief still waits for it in this plan).
    (host.manifests / "desk.yaml").write_text(desk.replace("runStrategy: Always", "runStrategy: Halted"))
    plan = host.cli("plan", str(host.manifests))
    assert f"hostDevices[gpu]: give {GPU}, {AUDIO} back to the host" in plan.stdout, plan.stdout
    assert "hostDevices[token]: give usb:1-2 back to the host" in plan.stdout, plan.stdout
    assert "thief cannot be changed" in plan.stdout, plan.stdout

    # The devices leave the manifest: every member goes back to its own driver, the nodes to their owners,
    # the claims are forgotten, and the VM boots without them.
    (host.manifests / "thief.yaml").unlink()
    (host.manifests / "nicvm.yaml").unlink()
    host.write("desk.yaml", vm_manifest("desk"))
    done = host.apply(check=False)
    assert hw.driver_of(GPU) == "nouveau" and hw.driver_of(AUDIO) == "snd_hda_intel", done.stdout + done.stderr
    assert (hw.sys / f"bus/pci/devices/{GPU}/driver_override").read_text().strip() == ""
    assert not (hw.dev / "vfio/1").exists()
    assert _owner(hw.dev / "bus/usb/001/004") == (0, 0o664)
    assert not (host.state / "hostdevs.json").exists()
    assert done.returncode == 0, done.stdout + done.stderr
    host.guest("desk").wait_report(lambda r: "vda" in r.disks, what="the VM boots without its host devices",
                                   timeout=180)
    assert host.plan_exit() == 0


def test_usb_devices_hotplugged_and_unplugged_on_a_running_vm(host: Host, fake: tuple[FakeHost, Kernel]) -> None:
    """The QEMU half of USB passthrough, on a real QEMU: started with a usb-host on its xHCI controller, a
    second one is hot-plugged (device_add) and the first unplugged live, same PID, and the node of each goes to
    QEMU's user and back. The guest sees no USB device: the host has none to give (the fake sysfs lists them,
    /dev/bus/usb does not), so QEMU's usb-host waits for a device that never comes. Not a passthrough proof."""
    hw, _ = fake
    qemu_uid = pwd.getpwnam("infinization-qemu").pw_uid
    mouse = hw.usb(1, "3", 5, "046d", "c52b")
    host.config.write_text(host.config.read_text().replace("usbPassthrough: ['1050:0407']",
                                                           "usbPassthrough: ['1050:0407', '046d:c52b']"))
    token = '    - {name: token, usb: {vendor: "0x1050", product: "0x0407"}}\n'
    second = '    - {name: mouse, usb: {bus: 1, port: "3"}}\n'
    host.write("desk.yaml", vm_manifest("desk", extra="  hostDevices:\n" + token))
    host.apply()
    (pid,) = host.qemu_pids("desk")
    host.guest("desk").wait_report(lambda r: "vda" in r.disks, what="boot", timeout=180)
    assert _owner(hw.dev / "bus/usb/001/004") == (qemu_uid, 0o600)

    host.write("desk.yaml", vm_manifest("desk", extra="  hostDevices:\n" + second))
    plan = host.cli("plan", str(host.manifests))
    assert "host device mouse: hot-plug on the xHCI controller (device_add)" in plan.stdout, plan.stdout
    assert "host device token: unplug" in plan.stdout and "0 to restart" in plan.stdout, plan.stdout
    assert "restart pending" not in plan.stdout, plan.stdout
    done = host.apply()
    assert host.qemu_pids("desk") == [pid], done.stdout
    assert _owner(mouse) == (qemu_uid, 0o600) and _owner(hw.dev / "bus/usb/001/004") == (0, 0o664)
    claims = json.loads((host.state / "hostdevs.json").read_text())["claims"]
    assert list(claims) == ["usb:1-3"]
    assert host.plan_exit() == 0  # the live QEMU has hostdev-mouse (read back over QMP), nothing left to do

    # A PCI function added live: taken (the group bound), then device_add vfio-pci on a spare root port reaches
    # the real QEMU, which (no IOMMU group in the real /sys) refuses it in its own words; the VM runs on.
    gpu = f'    - {{name: gpu, pci: "{GPU}"}}\n'
    host.write("desk.yaml", vm_manifest("desk", extra="  hostDevices:\n" + second + gpu))
    plan = host.cli("plan", str(host.manifests))
    assert "host device gpu: hot-plug on a spare root port (device_add)" in plan.stdout, plan.stdout
    done = host.apply(check=False)
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "vfio" in said and GPU in said and "hot-plug" in said, said
    assert host.qemu_pids("desk") == [pid]
    assert hw.driver_of(GPU) == hw.driver_of(AUDIO) == "vfio-pci"
    # Dropped again: QEMU does not have it, so the group goes back to its drivers while the VM runs.
    host.write("desk.yaml", vm_manifest("desk", extra="  hostDevices:\n" + second))
    host.apply()
    assert hw.driver_of(GPU) == "nouveau" and hw.driver_of(AUDIO) == "snd_hda_intel"
    assert host.qemu_pids("desk") == [pid] and host.plan_exit() == 0
