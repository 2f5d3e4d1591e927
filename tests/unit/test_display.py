"""Displays, pure parts: the argv (no password on it, ever), the model's refusals, port assignment and the
password step in the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.plan import display
from reconciler.plan.observed import LiveDisplay, LiveState, ObservedProcess, ObservedSecret, ObservedState, ObservedVM
from reconciler.qemu.argv import build_argv
from reconciler.spec.host import HostConfig
from reconciler.spec.loader import load_text
from reconciler.spec.models import VirtualMachine
from reconciler.state.layout import StateLayout

BASE = """apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {name: NAME}
spec:
  boot: {kernel: /srv/k}
"""
PATHS = StateLayout(Path("/var/lib/infz")).vm("web")


def _vm(extra: str, name: str = "web") -> VirtualMachine:
    objects, errors = load_text(BASE.replace("NAME", name) + extra, "web.yaml")
    assert not errors, errors
    vm = objects[0][0]
    assert isinstance(vm, VirtualMachine)
    return vm


def _errors(extra: str) -> str:
    _, errors = load_text(BASE.replace("NAME", "web") + extra, "web.yaml")
    return "\n".join(str(error) for error in errors)


def _argv(extra: str, port: int = 5901) -> list[str]:
    vm = _vm(extra)
    return build_argv(vm.name, display.with_port(vm.spec, port) if vm.spec.display.enabled else vm.spec, PATHS)


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def _devices(argv: list[str]) -> list[dict[str, object]]:
    return [json.loads(x) for x in _after(argv, "-device")]


def test_vnc_with_a_password_starts_locked_and_never_carries_it() -> None:
    argv = _argv("  display: {type: vnc, passwordFile: /etc/infinization/secrets/web}\n  audio: {enabled: true}\n")
    assert _after(argv, "-vnc") == ["127.0.0.1:1,password=on,audiodev=snd0"]
    assert _after(argv, "-audiodev") == ["none,id=snd0"]
    devices = _devices(argv)
    assert {"driver": "virtio-vga", "id": "video0"} in devices
    assert {"driver": "usb-tablet", "id": "tablet0", "bus": "usb0.0"} in devices
    assert {"driver": "hda-duplex", "id": "sound0-codec", "bus": "sound0.0", "audiodev": "snd0"} in devices
    assert not any("password=" in arg and "password=on" not in arg for arg in argv)
    assert "/etc/infinization/secrets/web" not in " ".join(argv), "QEMU never opens the password file"


def test_spice_gets_qxl_its_agent_channel_and_audio_and_no_ticketing_only_without_a_password() -> None:
    argv = _argv("  display:\n    type: spice\n    listen: '::1'\n    spice: {imageCompression: quic, "
                 "streamingVideo: all}\n  audio: {enabled: true}\n", port=5990)
    assert _after(argv, "-spice") == ["port=5990,addr=::1,image-compression=quic,streaming-video=all,agent-mouse=on,"
                                      "disable-ticketing=on"]
    assert _after(argv, "-audiodev") == ["spice,id=snd0"]
    assert _after(argv, "-chardev")[-1] == "spicevmc,id=chr-vdagent,name=vdagent"
    devices = _devices(argv)
    assert {"driver": "qxl-vga", "id": "video0"} in devices
    assert {"driver": "virtserialport", "bus": "vserial0.0", "chardev": "chr-vdagent", "name": "com.redhat.spice.0",
            "id": "vdagent0"} in devices
    assert {"driver": "virtio-serial-pci", "id": "vserial0"} in devices
    locked = _argv("  display: {type: spice, passwordFile: /etc/infinization/secrets/w, spice: {agent: false}}\n")
    assert _after(locked, "-spice") == ["port=5901,addr=127.0.0.1,image-compression=auto_glz,streaming-video=filter,"
                                        "agent-mouse=off"]
    assert "vdagent" not in " ".join(locked)


def test_no_display_no_devices_and_the_tablet_follows_the_display_unless_told() -> None:
    assert not {d["driver"] for d in _devices(_argv(""))} & {"qemu-xhci", "usb-tablet", "virtio-vga", "qxl-vga"}
    tabletless = _devices(_argv("  display: {type: vnc}\n  input: {tablet: false}\n"))
    assert "usb-tablet" not in {d["driver"] for d in tabletless}
    assert "usb-tablet" in {d["driver"] for d in _devices(_argv("  input: {tablet: true}\n"))}
    ipv6 = _argv("  display: {type: vnc, listen: '::1', port: 5999}\n", port=5999)
    assert _after(ipv6, "-vnc") == ["[::1]:99"]


def test_an_unresolved_auto_port_never_reaches_qemu() -> None:
    vm = _vm("  display: {type: vnc}\n")
    with pytest.raises(ValueError, match="must be resolved"):
        build_argv(vm.name, vm.spec, PATHS)


@pytest.mark.parametrize(("extra", "error"), [
    ("  display: {type: vnc, listen: 0.0.0.0}\n", "beyond loopback: a passwordFile is required"),
    ("  display: {type: spice, listen: 192.0.2.1}\n", "beyond loopback: a passwordFile is required"),
    ("  display: {type: vnc, port: 5899}\n", "greater than or equal to 5900"),
    ("  display: {type: vnc, passwordFile: 'relative/x'}\n", "absolute path"),
    ("  display: {type: vnc, passwordFile: '/etc/x,password=on'}\n", "must not contain ','"),
    ("  display: {type: vnc, spice: {agent: true}}\n", "spice options need type: spice"),
    ("  display: {type: none, port: 5901}\n", "need type vnc or spice"),
    ("  audio: {enabled: true}\n", "audio.enabled needs a display"),
    ("  display: {type: vnc, listen: 'localhost'}\n", "not an IP address"),
    ("  display: {type: vnc, passwordExpiresAfter: 60}\n", "passwordExpiresAfter needs a passwordFile"),
])
def test_the_model_refuses(extra: str, error: str) -> None:
    assert error in _errors(extra)


def test_host_policy_display_range_stays_above_vnc_base() -> None:
    with pytest.raises(ValueError, match="5900 or above"):
        HostConfig(displayPortRange="5000-5999")
    assert HostConfig().secretDirs == ["/etc/infinization/secrets"]


def _observed(**kwargs: object) -> ObservedState:
    return ObservedState.model_validate({"state_dir": "/st", **kwargs})


def test_ports_are_stable_unique_and_skip_busy_ones() -> None:
    host = HostConfig(displayPortRange="5900-5903")
    desired = {name: _vm("  display: {type: vnc}\n", name) for name in ("a", "b", "c")}
    # b keeps its recorded port; a and c take the lowest free ones, skipping 5900 (a foreign listener).
    got = display.assign_ports(desired, _observed(display_ports={"b": 5901}, listening=[5900]), host)
    assert got == {"b": 5901, "a": 5902, "c": 5903}
    full = display.assign_ports({**desired, "d": _vm("  display: {type: vnc}\n", "d")},
                                _observed(display_ports={"b": 5901}, listening=[5900]), host)
    assert full["d"] == "spec.display.port: auto: no free port left in displayPortRange 5900-5903"
    # A VM not desired here (being deleted, or another file's) keeps its port out of reach.
    assert display.assign_ports({"a": desired["a"]}, _observed(display_ports={"z": 5900}), host) == {"a": 5901}


def test_a_vms_own_running_qemu_does_not_make_its_port_busy() -> None:
    host = HostConfig(displayPortRange="5900-5903")
    live = LiveState(cpus=1, memory=1, free_slots=0, display=LiveDisplay(protocol="vnc", host="127.0.0.1", port=5900))
    running = ObservedVM(name="a", process=ObservedProcess(pid=1, status="running", live=live))
    observed = _observed(display_ports={"a": 5900}, listening=[5900], vms={"a": running.model_dump()})
    assert display.assign_ports({"a": _vm("  display: {type: vnc}\n", "a")}, observed, host) == {"a": 5900}


def _running(launched: VirtualMachine, set_digest: str | None, digest: str) -> ObservedVM:
    spec = display.with_port(launched.spec, 5900)
    live = LiveState(cpus=1, memory=1, free_slots=0, display=LiveDisplay(protocol="vnc", host="127.0.0.1", port=5900))
    return ObservedVM(name="web", process=ObservedProcess(pid=1, start_time=2, status="running", launched=spec,
                                                          live=live),
                      display_password=set_digest, secret=ObservedSecret(path="/s/web", digest=digest, length=8))


def test_the_password_is_set_when_its_hash_differs_and_never_travels_in_the_step() -> None:
    vm = _vm("  display: {type: vnc, passwordFile: /s/web}\n")
    spec = display.with_port(vm.spec, 5900)
    same = display.plan_display("web", spec, _running(vm, "h1", "h1"), _observed(display_ports={"web": 5900}), 5900)
    assert not same.live and not same.steps and not same.restart_causes
    rotated = display.plan_display("web", spec, _running(vm, "h1", "h2"), _observed(display_ports={"web": 5900}),
                                   5900)
    assert rotated.reasons == ["display password rotated"]
    assert [step.kind.value for step in rotated.live] == ["set-display-password"]
    assert rotated.live[0].args == {"protocol": "vnc", "path": "/s/web", "expires_after": None}
    unset = display.plan_display("web", spec, _running(vm, None, "h2"), _observed(display_ports={"web": 5900}), 5900)
    assert unset.reasons == ["display password not set on the running QEMU"]


def test_query_vnc_and_query_spice_answers_become_the_live_display() -> None:
    from reconciler.observe.live import LiveAnswers, parse_live
    from reconciler.state.models import LiveRecord

    def answers(vnc: object, spice: object) -> LiveAnswers:
        return LiveAnswers(devices={}, nodes=set(), block=[], network_info="", macs={}, cpus=1, memory_summary={},
                           memory_devices=[], pci=[], vnc=vnc, spice=spice)  # type: ignore[arg-type]

    record = LiveRecord(pid=1, start_time=1)
    vnc = {"enabled": True, "host": "127.0.0.1", "service": "5901", "family": "ipv4", "auth": "vnc", "clients": []}
    assert parse_live(answers(vnc, {"enabled": False}), None, record).display == LiveDisplay(
        protocol="vnc", host="127.0.0.1", port=5901, auth="vnc")
    spice = {"enabled": True, "migrated": False, "host": "::1", "port": 5990, "auth": "spice", "channels": []}
    assert parse_live(answers({"enabled": False}, spice), None, record).display == LiveDisplay(
        protocol="spice", host="::1", port=5990, auth="spice")
    assert parse_live(answers(None, None), None, record).display is None
