"""The pure argv builder: what QEMU is asked for, and that no value can inject an option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.qemu.argv import OpenedFiles, UnsafeOptionValue, _kv, build_argv
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


def test_a_boot_once_cdrom_boots_first_and_a_reboot_ends_the_install() -> None:
    """An install start: the bootOnce CD gets bootindex 1 and the guest's first reboot ends QEMU; once the
    install is over (bootOnce off in the spec QEMU gets), neither."""
    vm = _vm()
    cdroms = [{"name": "install", "image": "/srv/cd.iso", "bootOnce": True}, {"name": "drivers"}]
    installing = vm.spec.model_validate({**vm.spec.model_dump(), "cdroms": cdroms})
    argv = build_argv(vm.name, installing, StateLayout(Path("/st")).vm(vm.name))
    devices = [json.loads(arg) for arg in _after(argv, "-device") if arg.startswith("{")]
    boots = {d["id"]: d.get("bootindex") for d in devices if d["driver"] == "scsi-cd"}
    assert boots == {"cd-install": 1, "cd-drivers": None}
    assert _after(argv, "-action") == ["reboot=shutdown"]
    done = installing.model_copy(update={"cdroms": [c.model_copy(update={"bootOnce": False})
                                                    for c in installing.cdroms]})
    argv = build_argv(vm.name, done, StateLayout(Path("/st")).vm(vm.name))
    assert "-action" not in argv and '"bootindex"' not in " ".join(argv)
