"""The pure argv builder: what QEMU is asked for, and that no value can inject an option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.qemu.argv import OpenedFiles, UnsafeOptionValue, _kv, build_argv, swtpm_argv
from reconciler.spec.loader import load_text
from reconciler.spec.models import VirtualMachine
from reconciler.state.layout import StateLayout

MANIFEST = """apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {name: web}
spec:
  machine: {type: pc, accel: [kvm, tcg]}
  cpu: {sockets: 1, cores: 2, threads: 1, model: qemu64}
  memory: {size: 1Gi}
  boot: {kernel: /srv/k, initrd: /srv/i, cmdline: "console=ttyS0,115200 root=/dev/vda"}
  disks: [{name: root, size: 1Gi}]
  networks: [{name: nat, mac: "52:54:00:00:00:09", portForwards: [{host: 2222, guest: 22}]}]
"""


def _vm() -> VirtualMachine:
    objects, errors = load_text(MANIFEST, "x")
    assert not errors
    vm = objects[0][0]
    assert isinstance(vm, VirtualMachine)
    return vm


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def test_argv_carries_the_spec() -> None:
    vm = _vm()
    paths = StateLayout(Path("/var/lib/infz")).vm("web")
    argv = build_argv(vm.name, vm.spec, paths)
    assert argv[0] == "qemu-system-x86_64"
    assert _after(argv, "-machine") == ["pc"]
    assert _after(argv, "-accel") == ["kvm", "tcg"]
    assert _after(argv, "-smp") == ["2,sockets=1,cores=2,threads=1,maxcpus=2"]
    assert _after(argv, "-m") == ["size=1024M"]
    assert _after(argv, "-append") == ["console=ttyS0,115200 root=/dev/vda"]
    assert _after(argv, "-pidfile") == ["/var/lib/infz/vms/web/run/qemu.pid"]
    # QEMU runs in the foreground under its seccomp sandbox (7.2 kills a -daemonize'd QEMU under spawn=deny).
    assert "-daemonize" not in argv and "-nodefaults" in argv
    assert _after(argv, "-sandbox") == ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    blockdevs = [json.loads(x) for x in _after(argv, "-blockdev")]
    assert blockdevs[1] == {"driver": "qcow2", "node-name": "disk-root", "file": "file-root"}
    assert blockdevs[0]["filename"] == "/var/lib/infz/disks/web/root.qcow2"
    devices = [json.loads(x) for x in _after(argv, "-device")]
    assert {"driver": "virtio-net-pci", "id": "nic-nat", "netdev": "net-nat", "mac": "52:54:00:00:00:09"} in devices
    assert _after(argv, "-netdev") == ["user,id=net-nat,hostfwd=tcp:127.0.0.1:2222-:22"]
    assert not [d for d in devices if d["driver"] == "pcie-root-port"], "i440fx hot-plugs onto pci.0"
    monitors = [a for a in _after(argv, "-chardev") if a.startswith("socket")]
    assert len(monitors) == 2, "one monitor for commands, one kept free for an event listener"


def test_restrict_on_a_user_nic_is_passed_to_qemu_with_its_forwards() -> None:
    objects, errors = load_text(MANIFEST.replace('portForwards:', 'restrict: true, portForwards:'), "x")
    assert not errors and isinstance(objects[0][0], VirtualMachine)
    vm = objects[0][0]
    argv = build_argv(vm.name, vm.spec, StateLayout(Path("/s")).vm("web"))
    assert _after(argv, "-netdev") == ["user,id=net-nat,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22"]


def test_argv_is_deterministic() -> None:
    vm = _vm()
    paths = StateLayout(Path("/s")).vm("web")
    assert build_argv(vm.name, vm.spec, paths) == build_argv(vm.name, vm.spec, paths)


@pytest.mark.parametrize("value", ["a,b", "a=b", "a\nb", "a\x00b"])
def test_kv_refuses_separators(value: str) -> None:
    with pytest.raises(UnsafeOptionValue):
        _kv("file", path=value)


def test_state_dir_with_a_comma_is_refused() -> None:
    vm = _vm()
    with pytest.raises(ValueError, match="must not contain"):
        build_argv(vm.name, vm.spec, StateLayout(Path("/tmp/a,b")).vm("web"))


def test_overlong_socket_paths_are_refused_clearly() -> None:
    vm = _vm()
    with pytest.raises(ValueError, match="longer than 107 bytes"):
        build_argv(vm.name, vm.spec, StateLayout(Path("/tmp/" + "x" * 100)).vm("web"))


def test_hotplug_maxima_shape_smp_and_memory() -> None:
    vm = _vm()
    spec = vm.spec.model_copy(update={
        "machine": vm.spec.machine.model_copy(update={"type": "q35"}),
        "cpu": vm.spec.cpu.model_copy(update={"cores": 1, "maxCpus": 4}),
        "memory": vm.spec.memory.model_copy(update={"maxSize": 4 * 1024**3, "balloon": True}),
    })
    argv = build_argv(vm.name, spec, StateLayout(Path("/s")).vm("web"))
    assert _after(argv, "-smp") == ["1,sockets=1,cores=4,threads=1,maxcpus=4"]
    assert _after(argv, "-m") == ["size=1024M,slots=8,maxmem=4096M"]
    devices = [json.loads(x) for x in _after(argv, "-device")]
    assert {"driver": "virtio-balloon-pci", "id": "balloon0"} in devices
    assert {"driver": "pcie-root-port", "id": "rp-disk-root", "chassis": 1, "bus": "pcie.0"} in devices
    disk = next(d for d in devices if d["id"] == "disk-root")
    assert disk["bus"] == "rp-disk-root", "cold-plugged devices sit on their own port, so they can be unplugged"
    spares = [d["id"] for d in devices if d["id"].startswith("hp-")]
    assert spares == ["hp-0", "hp-1", "hp-2", "hp-3"], "4 spare hot-plug slots by default"


BRIDGED = MANIFEST.replace('networks: [{name: nat, mac: "52:54:00:00:00:09", portForwards: [{host: 2222, guest: 22}]}]',
                           "networks: [{name: lan, type: bridge, bridge: br0, queues: 2}]\n"
                           "  cdroms: [{name: cd, image: /srv/cd.iso}]")


def test_what_the_executor_opened_is_handed_to_qemu_as_fds_and_copies() -> None:
    """QEMU's unprivileged user opens none of the spec's paths: fd sets, inherited fds, private copies."""
    objects, errors = load_text(BRIDGED.replace("disks: [{name: root, size: 1Gi}]",
                                                "disks: [{name: root, image: /srv/base.img, imageFormat: raw}]"), "x")
    assert not errors and isinstance(objects[0][0], VirtualMachine)
    vm = objects[0][0]
    paths = StateLayout(Path("/var/lib/infz")).vm("web")
    opened = OpenedFiles(disks={"root": 1}, backing={"root": 2}, cdroms={"cd": 3},
                         fds={1: 20, 2: 21, 3: 22}, names={1: "/var/lib/infz/disks/web/root.qcow2", 2: "/srv/base.img",
                                                            3: "/srv/cd.iso"},
                         vhost={"lan": [30, 31]}, kernel="/var/lib/infz/vms/web/run/kernel",
                         initrd="/var/lib/infz/vms/web/run/initrd")
    argv = build_argv(vm.name, vm.spec, paths, taps={"lan": [10, 11]}, files=opened)
    assert _after(argv, "-add-fd") == ["fd=20,set=1,opaque=/var/lib/infz/disks/web/root.qcow2",
                                       "fd=21,set=2,opaque=/srv/base.img", "fd=22,set=3,opaque=/srv/cd.iso"]
    blockdevs = {node["node-name"]: node for node in map(json.loads, _after(argv, "-blockdev"))}
    assert blockdevs["file-root"]["filename"] == "/dev/fdset/1"
    assert blockdevs["basefile-root"] == {"driver": "file", "node-name": "basefile-root", "filename": "/dev/fdset/2",
                                          "read-only": True}
    assert blockdevs["base-root"]["driver"] == "raw" and blockdevs["base-root"]["read-only"] is True
    assert blockdevs["disk-root"]["backing"] == "base-root", "the header's backing path is never opened"
    assert blockdevs["cd-cd"]["file"]["filename"] == "/dev/fdset/3"
    assert _after(argv, "-netdev") == ["tap,id=net-lan,fds=10:11,vhostfds=30:31,vhost=on"]
    assert (_after(argv, "-kernel"), _after(argv, "-initrd")) == (
        ["/var/lib/infz/vms/web/run/kernel"], ["/var/lib/infz/vms/web/run/initrd"])
    assert not [arg for arg in argv if arg.startswith("/srv/") or "/srv/" in arg.split("opaque=")[0]]


DEVICES = """apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {name: desk}
spec:
  machine: {type: q35, accel: [tcg]}
  disks:
  - {name: root, size: 1Gi}
  - {name: data, size: 1Gi, bus: scsi, cache: none, discard: unmap, readOnly: true}
  - {name: inst, size: 1Gi, bus: sata, cache: writethrough}
  - {name: inst2, size: 1Gi, bus: sata, cache: unsafe}
  networks: [{name: nat, model: e1000e, mac: "52:54:00:00:00:0a"}]
"""


def _load(text: str) -> VirtualMachine:
    objects, errors = load_text(text, "x")
    assert not errors, errors
    vm = objects[0][0]
    assert isinstance(vm, VirtualMachine)
    return vm


def test_device_models_cache_discard_read_only_rng_and_uuid() -> None:
    vm = _load(DEVICES)
    argv = build_argv(vm.name, vm.spec, StateLayout(Path("/var/lib/infz")).vm("desk"))
    devices = {d["id"]: d for d in map(json.loads, _after(argv, "-device")) if "id" in d}
    nodes = {n["node-name"]: n for n in map(json.loads, _after(argv, "-blockdev"))}
    assert devices["disk-root"]["driver"] == "virtio-blk-pci" and devices["disk-root"]["bus"] == "rp-disk-root"
    # No bootOrder: the disks boot in their order (bootindex 1, 2, ...).
    assert devices["disk-data"] == {"driver": "scsi-hd", "id": "disk-data", "drive": "disk-data", "serial": "data",
                                    "bus": "scsi0.0", "bootindex": 2}
    assert devices["disk-inst"] == {"driver": "ide-hd", "id": "disk-inst", "drive": "disk-inst", "serial": "inst",
                                    "bus": "ide.0", "write-cache": "off", "bootindex": 3}
    assert devices["disk-inst2"]["bus"] == "ide.1" and "write-cache" not in devices["disk-inst2"]
    assert "rp-disk-data" not in devices and "rp-disk-inst" not in devices  # on their controllers
    for node in ("file-data", "disk-data"):
        assert nodes[node]["cache"] == {"direct": True, "no-flush": False}
        assert nodes[node]["discard"] == "unmap" and nodes[node]["read-only"] is True
    assert nodes["disk-inst2"]["cache"] == {"direct": False, "no-flush": True}
    assert "cache" not in nodes["disk-root"] and "discard" not in nodes["disk-root"]
    assert devices["nic-nat"]["driver"] == "e1000e"
    assert devices["rng0"] == {"driver": "virtio-rng-pci", "id": "rng0", "rng": "rng0-source"}
    assert [json.loads(x) for x in _after(argv, "-object")] == [
        {"qom-type": "rng-random", "id": "rng0-source", "filename": "/dev/urandom"}]
    uuid = _after(argv, "-uuid")
    assert uuid == _after(build_argv("desk", vm.spec, StateLayout(Path("/other")).vm("desk")), "-uuid")
    assert uuid != _after(build_argv("other", vm.spec, StateLayout(Path("/var/lib/infz")).vm("other")), "-uuid")
    assert _after(argv, "-cpu") == []  # TCG: QEMU's default model


def test_rng_can_be_dropped_and_cpu_host_only_where_the_accelerator_is_kvm() -> None:
    vm = _load(MANIFEST.replace("model: qemu64", "model: null") + "  rng: {enabled: false}\n")
    argv = build_argv(vm.name, vm.spec, StateLayout(Path("/var/lib/infz")).vm("web"))
    assert "-object" not in argv and "virtio-rng-pci" not in " ".join(argv)
    assert _after(argv, "-cpu") == []  # [kvm, tcg]: QEMU may fall back to TCG, where -cpu host fails
    kvm = _load(MANIFEST.replace("model: qemu64", "model: null").replace("[kvm, tcg]", "[kvm]"))
    assert _after(build_argv(kvm.name, kvm.spec, StateLayout(Path("/v")).vm("web")), "-cpu") == ["host"]
    assert _after(build_argv(vm.name, _vm().spec, StateLayout(Path("/v")).vm("web")), "-cpu") == ["qemu64"]


@pytest.mark.parametrize(("disk", "error"), [
    ("{name: d, size: 1Gi, bus: sata, readOnly: true}", "readOnly needs bus virtio or scsi"),
    ("{name: d, image: /srv/base.qcow2, preallocation: full}", "preallocation needs a disk without image"),
    ("{name: d, size: 1Gi, bus: ide}", "bus"),
])
def test_device_options_that_qemu_would_refuse_are_refused_by_the_spec(disk: str, error: str) -> None:
    _, errors = load_text(MANIFEST.replace("[{name: root, size: 1Gi}]", f"[{disk}]"), "x")
    assert errors and error in str(errors[0])


def test_sata_needs_q35_and_fits_six_ports() -> None:
    _, errors = load_text(MANIFEST.replace("[{name: root, size: 1Gi}]", "[{name: d, size: 1Gi, bus: sata}]"), "x")
    assert errors and "need machine type q35" in str(errors[0])
    seven = ", ".join(f"{{name: d{i}, size: 1Gi, bus: sata}}" for i in range(7))
    _, errors = load_text(DEVICES.replace("  - {name: root, size: 1Gi}\n", f"  - {seven}\n".replace(", {", "\n  - {")),
                          "x")
    assert errors and "at most 6 disks with bus sata" in str(errors[0])


def test_tpm_is_a_crb_device_on_the_vms_swtpm_socket_and_swtpm_keeps_state_outside_the_vm_folder() -> None:
    vm = _vm()
    paths = StateLayout(Path("/var/lib/infz")).vm("web")
    assert "-tpmdev" not in build_argv("web", vm.spec, paths)
    spec = vm.spec.model_copy(update={"tpm": vm.spec.tpm.model_copy(update={"enabled": True})})
    argv = build_argv("web", spec, paths)
    assert "socket,id=chrtpm,path=/var/lib/infz/vms/web/run/swtpm.sock" in _after(argv, "-chardev")
    assert _after(argv, "-tpmdev") == ["emulator,id=tpm0,chardev=chrtpm"]
    assert {"driver": "tpm-crb", "tpmdev": "tpm0", "id": "tpm-crb0"} in [json.loads(a) for a in _after(argv, "-device")]
    swtpm = swtpm_argv(paths, "/usr/bin/swtpm")
    assert swtpm[:3] == ["/usr/bin/swtpm", "socket", "--tpm2"] and "--terminate" in swtpm
    assert _after(swtpm, "--tpmstate") == ["dir=/var/lib/infz/tpm/web,mode=0600"]
    assert _after(swtpm, "--ctrl") == ["type=unixio,path=/var/lib/infz/vms/web/run/swtpm.sock,mode=0600"]
    assert _after(swtpm, "--pid") == ["file=/var/lib/infz/vms/web/run/swtpm.pid"]
    with pytest.raises(ValueError, match="must not contain"):
        swtpm_argv(StateLayout(Path("/var/lib/in=fz")).vm("web"))


UEFI = """apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {name: desk}
spec:
  firmware: {type: uefi, secureBoot: true}
  disks: [{name: root, size: 1Gi}]
  cdroms: [{name: install, image: /srv/iso/x.iso}, {name: drivers}]
  bootOrder: [cdrom:install, disk:root]
"""


def test_uefi_firmware_is_two_pflash_fd_sets_and_boot_order_is_bootindex() -> None:
    objects, errors = load_text(UEFI, "x")
    assert not errors and isinstance(objects[0][0], VirtualMachine)
    vm = objects[0][0]
    paths = StateLayout(Path("/s")).vm("desk")
    with pytest.raises(ValueError, match="UEFI"):
        build_argv(vm.name, vm.spec, paths)  # never lets QEMU open a firmware path itself
    argv = build_argv(vm.name, vm.spec, paths, files=OpenedFiles(firmware={"code": 7, "vars": 8}))
    nodes = {node["node-name"]: node for node in map(json.loads, _after(argv, "-blockdev"))}
    assert nodes["fwfile-code"] == {"driver": "file", "node-name": "fwfile-code", "filename": "/dev/fdset/7",
                                    "read-only": True}
    assert nodes["fw-code"]["read-only"] is True and nodes["fw-vars"]["read-only"] is False
    assert nodes["fwfile-vars"]["filename"] == "/dev/fdset/8"
    assert _after(argv, "-machine") == ["q35", "pflash0=fw-code,pflash1=fw-vars", "smm=on"]
    assert _after(argv, "-global") == ["driver=cfi.pflash01,property=secure,value=on"]
    boot = {d["id"]: d.get("bootindex") for d in map(json.loads, _after(argv, "-device")) if "id" in d}
    assert (boot["cd-install"], boot["disk-root"], boot["cd-drivers"]) == (1, 2, None)


def test_bios_boots_the_disks_in_order_by_default() -> None:
    vm = _vm()
    argv = build_argv(vm.name, vm.spec, StateLayout(Path("/s")).vm("web"))
    assert "-global" not in argv and _after(argv, "-machine") == ["pc"]
    assert [d.get("bootindex") for d in map(json.loads, _after(argv, "-device")) if d.get("id") == "disk-root"] == [1]


def test_a_boot_once_cdrom_boots_first_and_a_reboot_ends_the_install() -> None:
    """An install start: the bootOnce CD gets bootindex 1 and the guest's first reboot ends QEMU; once the
    install is over (bootOnce off in the spec QEMU gets), neither."""
    vm = _vm()
    cdroms = [{"name": "install", "image": "/srv/cd.iso", "bootOnce": True}, {"name": "drivers"}]
    installing = vm.spec.model_validate({**vm.spec.model_dump(), "cdroms": cdroms})
    argv = build_argv(vm.name, installing, StateLayout(Path("/st")).vm(vm.name))
    devices = [json.loads(arg) for arg in _after(argv, "-device") if arg.startswith("{")]
    boots = {d["id"]: d.get("bootindex") for d in devices if d["driver"] == "scsi-cd" or d["id"] == "disk-root"}
    assert boots == {"cd-install": 1, "cd-drivers": None, "disk-root": 2}  # the boot order follows the CD
    assert _after(argv, "-action") == ["reboot=shutdown"]
    done = installing.model_copy(update={"cdroms": [c.model_copy(update={"bootOnce": False})
                                                    for c in installing.cdroms]})
    argv = build_argv(vm.name, done, StateLayout(Path("/st")).vm(vm.name))
    devices = [json.loads(arg) for arg in _after(argv, "-device") if arg.startswith("{")]
    boots = {d["id"]: d.get("bootindex") for d in devices if d["driver"] == "scsi-cd" or d["id"] == "disk-root"}
    assert "-action" not in argv and boots == {"cd-install": None, "cd-drivers": None, "disk-root": 1}


def test_channels_and_the_guest_agent_are_virtserialports_on_unix_sockets_in_run() -> None:
    from reconciler.spec.naming import channel_key

    plain = _vm()
    paths = StateLayout(Path("/var/lib/infz")).vm("web")
    assert "virtio-serial-pci" not in " ".join(build_argv("web", plain.spec, paths))
    vm = _load(MANIFEST + "  guestAgent: {enabled: true}\n  channels: [{name: com.infinibay.service}]\n")
    argv = build_argv("web", vm.spec, paths)
    devices = [json.loads(d) for d in _after(argv, "-device") if d.startswith("{")]
    assert [d for d in devices if d["driver"] == "virtio-serial-pci"] == [{"driver": "virtio-serial-pci",
                                                                           "id": "vserial0"}]
    ports = {d["name"]: d for d in devices if d["driver"] == "virtserialport"}
    assert set(ports) == {"org.qemu.guest_agent.0", "com.infinibay.service"}
    key = channel_key("com.infinibay.service")
    assert ports["com.infinibay.service"]["chardev"] == f"chr-ch-{key}"
    assert ports["com.infinibay.service"]["bus"] == "vserial0.0"
    chardevs = _after(argv, "-chardev")
    assert "socket,id=chr-qga0,path=/var/lib/infz/vms/web/run/qga.sock,server=on,wait=off" in chardevs
    assert f"socket,id=chr-ch-{key},path=/var/lib/infz/vms/web/run/ch-{key}.sock,server=on,wait=off" in chardevs


@pytest.mark.parametrize(("channels", "error"), [
    ("[{name: 'a,b'}]", "should match pattern"),
    ("[{name: 'a=b'}]", "should match pattern"),
    ("[{name: org.qemu.guest_agent.0}]", "reserved for the guest agent"),
    ("[{name: x.y}, {name: x.y}]", "used twice"),
    ("[{name: ''}]", "at least 1 character"),
])
def test_channel_names_are_safe_unique_and_not_the_agents(channels: str, error: str) -> None:
    _, errors = load_text(MANIFEST + f"  channels: {channels}\n", "x")
    assert errors and error in str(errors[0]), errors


def test_a_paused_vm_starts_with_dash_s_and_only_a_paused_one() -> None:
    vm = _vm()
    paths = StateLayout(Path("/s")).vm("web")
    assert "-S" not in build_argv(vm.name, vm.spec, paths)
    paused = vm.spec.model_copy(update={"paused": True})
    assert build_argv(vm.name, paused, paths).count("-S") == 1
