"""Change host networking: bridges and TAPs over netlink (pyroute2), nftables, ip_forward.

TAPs are opened by us on /dev/net/tun (not persistent), attached to their bridge and handed to QEMU as
file descriptors, the way libvirt does: when QEMU exits, the TAP disappears with it, so nothing leaks.
Called by the executor and by ``vmprocess.start`` / ``hotplug.hotplug_nic``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.adapters import procfs, rtnl
from reconciler.errors import StepFailed
from reconciler.state import files

TUNSETIFF = 0x400454CA
if TYPE_CHECKING:
    from pyroute2.iproute.linux import IPRoute

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100


def _iproute() -> IPRoute:
    """A netlink socket. pyroute2 is imported here, not at the top: it takes 0.3-0.6 s to import, which
    every command would pay at start-up while only network steps use it (and only its rtnetlink part:
    ``adapters.rtnl``)."""
    return rtnl.iproute()()


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _no_slaac(bridge: str) -> str | None:
    """accept_ra=0 and autoconf=0 on the bridge: a guest's router advertisement configures nothing on the
    host. Set before the bridge comes up. None when nothing changed (or the host has no IPv6)."""
    conf = Path("/proc/sys/net/ipv6/conf") / bridge
    changed = []
    for key in ("accept_ra", "autoconf"):
        with contextlib.suppress(FileNotFoundError):
            if (conf / key).read_text().strip() != "0":
                (conf / key).write_text("0\n")
                changed.append(f"{key}=0")
    return ", ".join(changed) or None


def ensure_bridge(bridge: str, address: str | None, remove_address: str | None, ip_forward: bool,
                  ipv6: bool = False) -> str:
    """Create or repair the bridge: present, its address, IPv6 autoconfiguration off unless ``ipv6``, up."""
    done = []
    with _iproute() as ipr:
        index = _index(ipr, bridge)
        if index is None:
            ipr.link("add", ifname=bridge, kind="bridge")
            index = _index(ipr, bridge)
            done.append("created")
        assert index is not None
        current = {f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=index)}
        if remove_address and remove_address in current:
            ip, prefix = remove_address.split("/")
            ipr.addr("del", index=index, address=ip, prefixlen=int(prefix))
            done.append(f"removed {remove_address}")
        if address and address not in current:
            ip, prefix = address.split("/")
            ipr.addr("add", index=index, address=ip, prefixlen=int(prefix))
            done.append(f"address {address}")
        if not ipv6 and (changed := _no_slaac(bridge)):
            done.append(changed)
        ipr.link("set", index=index, state="up")
    if ip_forward:
        forward = Path("/proc/sys/net/ipv4/ip_forward")
        if forward.read_text().strip() != "1":
            forward.write_text("1\n")
            done.append("ip_forward on")
    return ", ".join(done) or "already in place"


def delete_bridge(bridge: str) -> str:
    with _iproute() as ipr:
        index = _index(ipr, bridge)
        if index is None:
            return "already gone"
        ipr.link("del", index=index)
    return "deleted"


def apply_firewall(script: str) -> str:
    done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StepFailed(f"nft refused the ruleset (nothing was changed): {done.stderr.strip()}")
    return "applied in one transaction"


def repair_tap(tap: str, bridge: str) -> str:
    with _iproute() as ipr:
        index, master = _index(ipr, tap), _index(ipr, bridge)
        if index is None:
            raise StepFailed(f"TAP {tap} is gone: the VM must be restarted to get it back")
        if master is None:
            raise StepFailed(f"bridge {bridge} does not exist")
        ipr.link("set", index=index, master=master, state="up")
    return f"attached to {bridge}, up"


def open_tap(name: str, bridge: str, queues: int, mac: str) -> list[int]:
    """Create TAP ``name`` (one fd per queue), attach it to ``bridge`` and set it up; return the fds.

    :raise StepFailed: When the TAP cannot be created or the bridge is missing.
    """
    NetlinkError = rtnl.netlink_error()  # looked up late, like pyroute2 itself

    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        with _iproute() as ipr:
            index, master = _index(ipr, name), _index(ipr, bridge)
            if master is None:
                raise StepFailed(f"bridge {bridge} does not exist")
            # The host side gets the guest's MAC with a 0xFE first byte (as libvirt does), so the bridge
            # never takes the guest's address as its own.
            ipr.link("set", index=index, master=master, address="fe" + mac[2:], state="up")
    except (OSError, NetlinkError) as exc:
        close_all(fds)
        raise StepFailed(f"cannot create TAP {name} on {bridge}: {exc}") from exc
    except StepFailed:
        close_all(fds)
        raise
    return fds


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def stop_dhcp(pidfile: Path) -> str:
    """SIGTERM the dnsmasq that owns ``pidfile`` (checked in /proc first), and wait for it."""
    pid = procfs.find_dnsmasq(pidfile)
    if pid is None:
        return "not running"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while procfs.is_alive(pid):
        if time.monotonic() > deadline:
            if procfs.find_dnsmasq(pidfile) == pid:
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    files.remove_pidfile(pidfile)
    return "stopped"


def ensure_dhcp(argv: list[str], pidfile: Path) -> str:
    """(Re)start dnsmasq with exactly ``argv``; it daemonizes itself and writes ``pidfile``."""
    pid = procfs.find_dnsmasq(pidfile)
    if pid is not None and list(procfs.read_cmdline(pid) or ()) == argv:
        return "already running"
    stopped = stop_dhcp(pidfile) if pid is not None else ""
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise StepFailed("dnsmasq is not installed (Debian package dnsmasq-base)") from exc
    if done.returncode != 0:
        raise StepFailed(f"dnsmasq refused to start: {done.stderr.strip()}")
    new = procfs.find_dnsmasq(pidfile)
    if new is None:
        raise StepFailed("dnsmasq exited right after starting")
    return f"{'restarted' if stopped else 'started'}, pid {new}"
