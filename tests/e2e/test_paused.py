"""spec.paused on real QEMU, proven from inside the guest: while paused it makes no progress (it prints no
INFZ-TICK line and its clock does not advance), and once resumed the same boot goes on (same boot id,
uptime continuing, one INFZ-BOOTED), with `apply` and under the sync daemon (which pauses again a VM
resumed behind its back, and resumes one paused behind its back, as drift).

Needs a guest with `infz.tick` (scripts/build-guest.sh; INFZ_GUEST_DIR for a copy built from this tree).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPClient

from tests.e2e.harness import Host, vm_manifest, wait_gone

TICK_RE = re.compile(r"INFZ-TICK up=([0-9.]+) boot=([0-9a-f]+)")
PAUSE_WINDOW = 8.0  # wall seconds a paused guest is watched for progress (a running one ticks ~3 times a second)


@dataclass(frozen=True)
class Tick:
    index: int  # its position among the serial log's ticks
    up: float
    boot: str


def ticks(host: Host, vm: str) -> list[Tick]:
    found = []
    for line in host.guest(vm)._lines():
        if (match := TICK_RE.search(line)) is not None:
            found.append(Tick(len(found), float(match.group(1)), match.group(2)))
    return found


def manifest(name: str, paused: bool, run_strategy: str = "Always") -> str:
    text = vm_manifest(name, run_strategy=run_strategy, memory="128Mi")
    text = text.replace('cmdline: "console=ttyS0 panic=-1"', 'cmdline: "console=ttyS0 panic=-1 infz.tick"')
    return text.replace(f"  runStrategy: {run_strategy}\n",
                        f"  runStrategy: {run_strategy}\n  paused: {'true' if paused else 'false'}\n")


def row(host: Host, vm: str) -> dict[str, object]:
    status = json.loads(host.cli("status", "--json", check=True).stdout)
    found: dict[str, object] = next(r for r in status["vms"] if r["name"] == vm)
    return found


def qmp(host: Host, vm: str, command: str) -> object:
    """One QMP command on the VM's monitor, from outside the reconciler (a person's hand)."""
    async def run() -> object:
        client = QMPClient("test")
        await client.connect(str(host.state / "vms" / vm / "run" / "qmp.sock"))
        try:
            return await client.execute(command)
        finally:
            await client.disconnect()
    return asyncio.run(run())


def run_state(host: Host, vm: str) -> str:
    answer = qmp(host, vm, "query-status")
    assert isinstance(answer, dict)
    return str(answer["status"])


def ticking(host: Host, vm: str, after: int = -1, timeout: float = 120) -> Tick:
    """The first tick past index ``after`` (the guest runs)."""
    found = host.wait_for(lambda: next((t for t in ticks(host, vm) if t.index > after), None),
                          f"{vm} to tick after tick {after}", timeout=timeout)
    assert isinstance(found, Tick)
    return found


def assert_no_progress(host: Host, vm: str) -> Tick:
    """The guest is paused: over PAUSE_WINDOW it prints nothing. Returns its last tick before the pause.

    Proving that nothing happens needs a window of time: this is the one wait that is not a poll."""
    before = ticks(host, vm)
    time.sleep(PAUSE_WINDOW)
    after = ticks(host, vm)
    assert len(after) == len(before), f"a paused guest printed {len(after) - len(before)} ticks"
    return before[-1]


def assert_same_boot_goes_on(host: Host, vm: str, last: Tick) -> Tick:
    """Resumed: the next tick is of the same boot, its uptime goes on from where it stopped (it did not
    advance by the time it was paused) and the guest did not boot again."""
    first = ticking(host, vm, after=last.index)
    assert first.boot == last.boot, "the guest booted again instead of resuming"
    assert last.up <= first.up < last.up + PAUSE_WINDOW / 2, (
        f"the guest's clock jumped from {last.up} to {first.up}: it ran (or rebooted) while paused")
    assert host.guest(vm).boots() == 1
    return first


def test_paused_with_apply_created_paused_resumed_paused_and_stopped(host: Host) -> None:
    host.write("p.yaml", manifest("p", paused=True))
    applied = host.apply()
    assert "start QEMU paused (-S" in applied.stdout
    pid = host.running_pid("p")
    assert pid is not None
    assert b"-S" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"), "created paused: started with -S"
    shown = row(host, "p")
    assert (shown["phase"], shown["runState"], shown["inSync"], shown["paused"]) == ("Paused", "prelaunch", True, True)
    assert host.plan_exit() == 0
    time.sleep(2.0)  # a window: a guest started with -S runs no code at all, not even its kernel
    assert host.guest("p").boots() == 0 and ticks(host, "p") == []

    # Resumed: it boots (the first time), and ticks.
    host.write("p.yaml", manifest("p", paused=False))
    assert "resume the VM (QMP cont" in host.apply().stdout
    ticking(host, "p", after=3)
    assert row(host, "p")["phase"] == "Running" and host.plan_exit() == 0

    # Paused live: the same QEMU, no progress while paused, the same boot once resumed.
    host.write("p.yaml", manifest("p", paused=True))
    assert "pause the VM (QMP stop" in host.apply().stdout
    assert run_state(host, "p") == "paused" and host.running_pid("p") == pid
    assert row(host, "p")["phase"] == "Paused" and host.plan_exit() == 0
    last = assert_no_progress(host, "p")
    host.write("p.yaml", manifest("p", paused=False))
    host.apply()
    assert_same_boot_goes_on(host, "p", last)
    assert host.running_pid("p") == pid

    # Paused by hand behind apply's back: the next apply resumes it, as drift.
    qmp(host, "p", "stop")
    plan = host.cli("plan", str(host.manifests), "--json", check=False)
    document = json.loads(plan.stdout)
    (change,) = [c for c in document["changes"] if c["name"] == "p"]
    assert change["drift"] == ["paused"] and [s["kind"] for s in change["steps"]][-1] == "resume"
    host.apply()
    assert run_state(host, "p") == "running"

    # A paused VM halted: the guest is resumed first so it sees the power button, and powers off cleanly.
    host.write("p.yaml", manifest("p", paused=True))
    host.apply()
    assert run_state(host, "p") == "paused"
    host.write("p.yaml", manifest("p", paused=True, run_strategy="Halted"))
    stopped = host.apply()
    assert wait_gone(pid, timeout=5)
    assert "INFZ-POWEROFF" in host.guest("p").serial.read_text(), stopped.stdout
    assert "resumed to shut down, guest powered off" in stopped.stdout
    assert host.plan_exit() == 0, "Halted and paused: nothing runs, nothing to do"


def test_paused_under_the_sync_daemon_is_level_triggered(host: Host) -> None:
    host.write("s.yaml", manifest("s", paused=False))
    daemon = host.start_sync()
    try:
        pid = host.wait_for(lambda: host.running_pid("s"), "the VM to start", timeout=120)
        ticking(host, "s", after=3)

        host.write("s.yaml", manifest("s", paused=True))
        host.wait_for(lambda: run_state(host, "s") == "paused", "the daemon to pause it", timeout=60)
        last = assert_no_progress(host, "s")

        # Resumed behind its back: the daemon pauses it again (a RESUME event wakes it), with a drift event.
        qmp(host, "s", "cont")
        host.wait_for(lambda: any(e["kind"] == "drift" and "paused" in str(e["message"]) for e in host.events("s")),
                      "a drift event", timeout=60)
        host.wait_for(lambda: run_state(host, "s") == "paused", "the daemon to pause it again", timeout=60)
        host.wait_for(lambda: any(e["kind"] == "pause" and e["result"] == "ok" for e in host.events("s")),
                      "the pause event")
        assert host.running_pid("s") == pid
        last = assert_no_progress(host, "s")  # paused again for real, not only in QEMU's answer

        host.write("s.yaml", manifest("s", paused=False))
        host.wait_for(lambda: run_state(host, "s") == "running", "the daemon to resume it", timeout=60)
        assert_same_boot_goes_on(host, "s", last)

        # Paused behind its back while the manifest says running: resumed, as drift.
        drifts = len([e for e in host.events("s") if e["kind"] == "drift"])
        qmp(host, "s", "stop")
        host.wait_for(lambda: len([e for e in host.events("s") if e["kind"] == "drift"]) > drifts,
                      "a second drift event", timeout=60)
        host.wait_for(lambda: run_state(host, "s") == "running", "the daemon to resume it", timeout=60)
        ticking(host, "s", after=ticks(host, "s")[-1].index)
        assert host.running_pid("s") == pid and host.guest("s").boots() == 1
    finally:
        host.stop_sync(daemon)
