"""The display's part of the QEMU command line: VNC or SPICE, its video device, the USB tablet, the sound
card and SPICE's agent channel (pure; called by ``qemu.argv.build_argv``).

No password is ever on the command line: a display with a ``passwordFile`` starts locked (VNC
``password=on`` with no password set refuses every client; SPICE with ticketing on and no ticket set does
too) until the executor sets the password over QMP (``apply.display``). The port is the one the planner
chose and recorded (``port: auto`` is resolved before the argv is built).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from reconciler.errors import UnsafeValue
from reconciler.spec.models import VNC_BASE_PORT, VirtualMachineSpec
from reconciler.spec.naming import (
    AUDIO_BACKEND,
    SOUND_CODEC,
    SOUND_DEVICE,
    TABLET_DEVICE,
    USB_CONTROLLER,
    VDAGENT_CHARDEV,
    VDAGENT_DEVICE,
    VDAGENT_PORT,
    VIDEO_DEVICE,
)

# The video device that fits each display: QXL for SPICE (its 2D acceleration and the agent's resize),
# virtio-vga for VNC (a plain framebuffer any guest driver or firmware can use).
VIDEO = {"spice": "qxl-vga", "vnc": "virtio-vga"}


def _device(options: dict[str, Any]) -> list[str]:
    return ["-device", json.dumps(options, separators=(",", ":"))]


def _check(value: str) -> str:
    if any(char in value for char in ",=\n\r\t\x00"):
        raise UnsafeValue(f"refusing QEMU option value {value!r}: it contains ',' '=' or a control character")
    return value


def display_port(spec: VirtualMachineSpec) -> int:
    port = spec.display.port
    if not isinstance(port, int):
        raise ValueError("the display port must be resolved (port: auto -> the recorded port) before QEMU starts")
    return port


def vnc_address(spec: VirtualMachineSpec) -> str:
    """``-vnc``'s address: ``HOST:DISPLAY`` (IPv6 in brackets), the port being 5900 + DISPLAY."""
    listen = spec.display.listen
    host = f"[{listen}]" if ipaddress.ip_address(listen).version == 6 else listen
    return _check(f"{host}:{display_port(spec) - VNC_BASE_PORT}")


def _vnc(spec: VirtualMachineSpec) -> list[str]:
    options = [vnc_address(spec)]
    if spec.display.passwordFile is not None:
        options.append("password=on")  # locked until set_password: never the password itself
    if spec.audio.enabled:
        options.append(f"audiodev={AUDIO_BACKEND}")
    return ["-vnc", ",".join(options)]


def _spice(spec: VirtualMachineSpec) -> list[str]:
    spice = spec.display.spice_options
    options = [f"port={display_port(spec)}", f"addr={_check(spec.display.listen)}",
               f"image-compression={spice.imageCompression}", f"streaming-video={spice.streamingVideo}",
               f"agent-mouse={'on' if spice.agent else 'off'}"]
    if spec.display.passwordFile is None:
        options.append("disable-ticketing=on")  # loopback only (the model refuses it beyond)
    return ["-spice", ",".join(options)]


def display_argv(spec: VirtualMachineSpec) -> list[str]:
    """The display server, its video device, the tablet and the sound card (nothing for ``type: none``)."""
    display = spec.display
    argv: list[str] = []
    if display.enabled and spec.audio.enabled:
        argv += ["-audiodev", f"{'spice' if display.type == 'spice' else 'none'},id={AUDIO_BACKEND}"]
    if display.type == "vnc":
        argv += _vnc(spec)
    elif display.type == "spice":
        argv += _spice(spec)
    if display.enabled:
        argv += _device({"driver": VIDEO[display.type], "id": VIDEO_DEVICE})
    if spec.tablet:
        argv += _device({"driver": "qemu-xhci", "id": USB_CONTROLLER})
        argv += _device({"driver": "usb-tablet", "id": TABLET_DEVICE, "bus": f"{USB_CONTROLLER}.0"})
    if display.enabled and spec.audio.enabled:
        argv += _device({"driver": "ich9-intel-hda", "id": SOUND_DEVICE})
        argv += _device({"driver": "hda-duplex", "id": SOUND_CODEC, "bus": f"{SOUND_DEVICE}.0",
                         "audiodev": AUDIO_BACKEND})
    return argv


def has_vdagent(spec: VirtualMachineSpec) -> bool:
    return spec.display.type == "spice" and spec.display.spice_options.agent


def vdagent_argv(controller: str) -> list[str]:
    """SPICE's agent channel: a spicevmc chardev on the virtserialport spice-vdagent looks for."""
    return ["-chardev", f"spicevmc,id={VDAGENT_CHARDEV},name=vdagent",
            *_device({"driver": "virtserialport", "bus": f"{controller}.0", "chardev": VDAGENT_CHARDEV,
                      "name": VDAGENT_PORT, "id": VDAGENT_DEVICE})]
