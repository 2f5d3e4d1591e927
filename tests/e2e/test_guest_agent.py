"""The guest agent against a real qemu-ga: a Debian 12 guest (scripts/build-rootfs.sh) with systemd,
systemd-networkd (DHCP on the user NIC) and qemu-guest-agent.

The guest prints ``INFZ-ROOTFS-UP ips=<addr/prefix,...> agent=<state>`` on its serial console once it is up,
and copies every journal line of qemu-ga and systemd-logind there as ``INFZ-JOURNAL ...``: qemu-ga logs
``guest-shutdown called``, logind logs ``Power key pressed`` when QEMU presses the ACPI power button. So the
console tells which way a stop went, from inside the guest.

One VM for the whole module (a boot costs ~25 s under TCG), in file order: status, fsfreeze, a stop through
the agent; then a second boot with qemu-ga stopped in the guest: status says it does not answer, and the
stop goes on to the power button. Skipped (collection) when the root filesystem is not built, unless
INFZ_REQUIRE_E2E=1.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters import agent
from tests.e2e.harness import GUEST_DIR, Host

VM = "deb"
GRACE = 90
UP = "INFZ-ROOTFS-UP"
BOOT_TIMEOUT = 360  # ~25 s on an idle machine; 150 s to over 240 s seen with 8 TCG guests on 2 cores (load 11-27)
SLOW = 30.0  # the test's own agent calls: on such a loaded host an answer can take more than 2 s


def _manifest(rootfs: Path, run_strategy: str = "Always") -> str:
    return f"""apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata:
  name: {VM}
spec:
  runStrategy: {run_strategy}
  machine: {{type: q35, accel: tcg}}
  cpu: {{cores: 1}}
  memory: {{size: 384Mi}}
  terminationGracePeriodSeconds: {GRACE}
  boot:
    kernel: {rootfs}/vmlinuz
    initrd: {rootfs}/initrd.img
    cmdline: "root=/dev/vda rw console=ttyS0"
  disks:
    - {{name: root, image: {rootfs}/rootfs.qcow2}}
  networks:
    - {{name: nat, type: user}}
  guestAgent: {{enabled: true}}
"""


class Console:
    """The VM's serial log (appended across boots), read as lines."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[str]:
        try:
            return self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def since(self, mark: int) -> list[str]:
        return self.lines()[mark:]

    def wait(self, needle: str, after: int = 0, timeout: float = 30) -> str:
        """The first line containing ``needle`` after line ``after``, polling until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.since(after) if needle in line]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                tail = "\n".join(self.lines()[-40:])
                raise AssertionError(f"the guest never printed {needle!r} within {timeout:g}s; console:\n{tail}")
            time.sleep(0.2)


def _up(line: str) -> tuple[list[str], str]:
    """(addresses, qemu-ga's unit state) from an ``INFZ-ROOTFS-UP ips=... agent=...`` line."""
    fields = dict(part.split("=", 1) for part in line.split(UP, 1)[1].split())
    return sorted(filter(None, fields["ips"].split(","))), fields["agent"]


@pytest.fixture(scope="module")
def debian(rootfs: Path) -> Iterator[tuple[Host, Console]]:
    base = Path(tempfile.mkdtemp(prefix="infz-", dir="/tmp"))
    host = Host(base)
    host.config.write_text(f"storageRoots: [{base}, {GUEST_DIR}, {rootfs}]\nportForwardRange: 10000-20000\n")
    try:
        yield host, Console(host.state / "vms" / VM / "run" / "serial.log")
    finally:
        host.kill_all()
        host.delete_firewall()
        deadline = time.monotonic() + 10
        while (left := host.leftover_processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"processes left behind by the test: {left}"


def _socket(host: Host) -> Path:
    return host.state / "vms" / VM / "run" / "qga.sock"


def _status(host: Host) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    row = json.loads(host.cli("status", "--json", check=True).stdout)["vms"][0]
    return row, time.monotonic() - started


def _poll_status(host: Host, answering: bool, timeout: float = 40) -> dict[str, Any]:
    """The status row once the agent's ``answering`` is as wanted (each call costs ~1 s of CPU: no tight loop)."""
    deadline = time.monotonic() + timeout
    while True:
        row, _ = _status(host)
        if row["agent"] is not None and row["agent"]["answering"] is answering:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"the agent's answering never became {answering}: {row['agent']}")
        time.sleep(1)


def _boot(host: Host, console: Console, rootfs: Path) -> list[str]:
    """Start the VM (Always) and wait for the guest to be up; its addresses."""
    mark = len(console.lines())
    host.write(f"{VM}.yaml", _manifest(rootfs))
    host.apply()
    addresses, unit = _up(console.wait(UP, after=mark, timeout=BOOT_TIMEOUT))
    assert unit == "active", f"qemu-guest-agent in the guest is {unit}"
    assert addresses, "the guest got no IPv4 address"
    return addresses


def _halt(host: Host, rootfs: Path) -> tuple[str, float]:
    """Set the VM Halted and apply: what apply printed, and how long it took."""
    host.write(f"{VM}.yaml", _manifest(rootfs, run_strategy="Halted"))
    started = time.monotonic()
    applied = host.apply()
    took = time.monotonic() - started
    assert not host.qemu_pids(VM), "QEMU still runs after the stop"
    return applied.stdout, took


def test_status_shows_the_os_and_the_addresses_the_guest_has(debian: tuple[Host, Console], rootfs: Path) -> None:
    host, console = debian
    addresses = _boot(host, console, rootfs)

    row = _poll_status(host, answering=True)
    assert row["agent"]["os"].startswith("Debian GNU/Linux 12"), row["agent"]
    assert sorted(row["agent"]["addresses"]) == addresses  # what the guest itself printed
    text = host.cli("status", check=True).stdout
    assert f"agent: {row['agent']['os']}; ips: {', '.join(addresses)}" in text, text


def _ticks(console: Console, mark: int) -> int:
    return sum(1 for line in console.since(mark) if line.startswith("INFZ-TICK"))


def _wait_ticks(console: Console, mark: int, count: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (seen := _ticks(console, mark)) < count:
        assert time.monotonic() < deadline, f"the guest's writer printed {seen} ticks, not {count}, in {timeout:g}s"
        time.sleep(0.1)
    return seen


def test_fsfreeze_blocks_writes_in_the_guest_until_thawed(debian: tuple[Host, Console]) -> None:
    host, console = debian
    socket = _socket(host)
    mark = len(console.lines())
    # In the guest: append to a file on the root filesystem every 0.2 s, and print a tick after each write
    # (the console is not on the frozen filesystem). While frozen, the write blocks, so the ticks stop.
    writer = "for n in $(seq 300); do echo tick >>/var/tmp/infz-writes; echo INFZ-TICK $n >/dev/ttyS0; sleep 0.2; done"
    asyncio.run(agent.call(socket, "guest-exec", {"path": "/bin/sh", "arg": ["-c", writer]}, SLOW))
    _wait_ticks(console, mark, 3)
    try:
        assert asyncio.run(agent.freeze(socket, SLOW)) >= 1
        frozen_at = _ticks(console, mark)
        assert asyncio.run(agent.fsfreeze_status(socket, SLOW)) == "frozen"
        row, took = _status(host)
        assert row["agent"]["answering"] is True and row["agent"]["detail"] == agent.FROZEN, row["agent"]
        assert took < 20
        # Unfrozen, the writer ticks 5 times a second; frozen, at most the write already past its block ends.
        started = time.monotonic()
        while time.monotonic() - started < 3:
            assert _ticks(console, mark) <= frozen_at + 1, "the guest wrote to a frozen filesystem"
            time.sleep(0.2)
    finally:
        thawed = asyncio.run(agent.thaw(socket, SLOW))
    assert thawed >= 1
    assert asyncio.run(agent.fsfreeze_status(socket, SLOW)) == "thawed"
    _wait_ticks(console, mark, frozen_at + 3)  # the writes go on
    assert _poll_status(host, answering=True)["agent"]["detail"] == ""


def test_a_stop_goes_through_the_agent(debian: tuple[Host, Console], rootfs: Path) -> None:
    host, console = debian
    assert host.qemu_pids(VM), "the VM of the first test is not running"
    mark = len(console.lines())
    out, took = _halt(host, rootfs)

    assert "guest powered off through the guest agent" in out, out
    after = "\n".join(console.since(mark))
    assert "guest-shutdown called, mode: powerdown" in after, after  # qemu-ga took the request
    assert "reboot: Power down" in after, after  # and the guest powered itself off
    assert "Power key pressed" not in after, after  # QEMU never pressed the ACPI power button
    assert took < GRACE / 2, f"the stop took {took:.1f}s (grace {GRACE}s)"


def test_a_silent_agent_is_reported_and_the_stop_presses_the_power_button(
        debian: tuple[Host, Console], rootfs: Path) -> None:
    host, console = debian
    _boot(host, console, rootfs)
    # Stop qemu-ga from inside the guest (through itself): the port stays, nothing answers on it any more.
    stop_agent = {"path": "/bin/systemctl", "arg": ["stop", "qemu-guest-agent"]}
    asyncio.run(agent.call(_socket(host), "guest-exec", stop_agent, SLOW))
    _poll_status(host, answering=False)
    row, took = _status(host)
    assert row["agent"] == {"answering": False, "addresses": [], "os": None,
                            "detail": f"no answer within {agent.DEADLINE:g}s"}
    assert took < 20, f"status took {took:.1f}s with a silent agent"
    assert "agent: not answering" in host.cli("status", check=True).stdout

    mark = len(console.lines())
    out, took = _halt(host, rootfs)
    assert "guest powered off" in out and "through the guest agent" not in out, out
    after = "\n".join(console.since(mark))
    assert "Power key pressed" in after, after  # logind saw the ACPI power button
    assert "guest-shutdown called" not in after, after
    assert "reboot: Power down" in after, after
    assert agent.DEADLINE <= took < GRACE / 2, f"the stop took {took:.1f}s (grace {GRACE}s)"
