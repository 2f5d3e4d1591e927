"""Chaos with the sync daemon running: a seeded, bounded sequence of out-of-band faults on two bridged VMs,
each detected and repaired, or reported (a failure event or condition) and repaired once the fault is gone.

Faults: SIGKILL a QEMU; ``device_del`` a disk over the VM's QMP socket (the short-lived clients' monitor,
used between the daemon's own sessions: the daemon keeps only the events monitor); delete a TAP; delete the
bridge; flush the nftables ruleset; delete a VM's pidfile; delete its record; fill the state directory's file
system (a small tmpfs) while a QEMU is killed, then free it; and once per run, stop PostgreSQL (the daemon
mirrors its statuses there, ``--database-file``), ``pg_ctl stop -m fast`` or ``-m immediate`` (a crash), for
the next ``OUTAGE`` faults, the first of them a SIGKILL: every one is repaired as usual (reconciling never
waits for the mirror), the daemon reports the mirror down (``infinization_status_mirror_up`` 0 and a
``status-mirror`` failure event), and once the server is back, within ``CATCH_UP`` seconds, its rows are
each VM's current state (phase, the running QEMU's PID, Ready) and the metric is 1 again.

The seed comes from ``INFZ_CHAOS_SEED`` (else random) and is printed first, with each fault and the counts
(injected / repaired / reported, and how many were PostgreSQL stops), so a failure can be replayed:
``INFZ_CHAOS_SEED=N pytest ... -s``. ``INFZ_CHAOS_FAULTS`` sets how many (default 10, plus the PostgreSQL
stop); where the outage falls and its stop mode come from a second generator of the same seed, so the other
faults of a seed are the ones they were before PostgreSQL was part of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.adapters import monitor
from reconciler.errors import MonitorError
from reconciler.runtime.store import open_readonly, store_host
from reconciler.spec.models import tap_name
from reconciler.spec.naming import disk_node
from tests.e2e.harness import GUEST_DIR, Host, in_netns, wait_gone
from tests.e2e.pgserver import PostgresServer

VMS = ("ca", "cb")
FULL = (b"No space left on device", b"database or disk is full")
REPAIR_TIMEOUT = 45.0
RESYNC = 5.0  # the daemon's full resync period here (Host.start_sync)
KILLS_PER_VM = 2  # the daemon backs off after 3 failure restarts in 2 minutes: stay under it
OUTAGE = 2  # faults injected while PostgreSQL is down
CATCH_UP = 45.0  # seconds for the rows to be the world once PostgreSQL is back (backoff <= 10 s; a loaded CI)
BOOT = 120.0  # a TCG guest's boot, two at once on a loaded 2-core runner (60 s timed out at load 60)
METRICS = "127.0.0.1:9464"  # inside the test's network namespace: no other test's port


def _vm(name: str, index: int) -> str:
    return f"""apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {{name: {name}}}
spec:
  machine: {{type: q35, accel: tcg}}
  memory: {{size: 256Mi}}
  hotplugSlots: 2
  terminationGracePeriodSeconds: 3
  boot: {{kernel: {GUEST_DIR}/vmlinuz, initrd: {GUEST_DIR}/initrd.img, cmdline: "console=ttyS0 panic=-1"}}
  disks:
    - {{name: root, size: 16Mi}}
    - {{name: data, size: 16Mi}}
  networks:
    - name: lan0
      type: bridge
      network: lan
      mac: "52:54:00:cf:00:0{index}"
      firewall: {{default: accept, rules: [{{direction: in, action: drop, protocol: icmp}}]}}
"""


NETWORK = """apiVersion: infinization.io/v1alpha1
kind: Network
metadata: {name: lan}
spec: {bridge: br-chaos, address: 10.79.0.1/24}
"""


def _full(log: bytes) -> str:
    """The first line of the daemon's log that reports the full file system ("" if none)."""
    return next((line.decode(errors="replace") for line in log.splitlines() if any(f in line for f in FULL)), "")


@dataclass
class Chaos:
    host: Host
    rng: random.Random
    pg: PostgresServer
    pids: dict[str, int] = field(default_factory=dict)
    kills: dict[str, int] = field(default_factory=dict)
    injected: int = 0
    repaired: int = 0
    reported: int = 0
    reported_in_log: str = ""
    pg_stops: int = 0
    expect: Callable[[], bool] = lambda: True  # what this fault's repair must also show

    # -- what the world looks like ----------------------------------------------------------------------

    def qemu(self, vm: str) -> int | None:
        pids = self.host.qemu_pids(vm)
        return pids[0] if len(pids) == 1 else None

    def netns(self, *argv: str) -> str:
        return in_netns(self.host.netns or "", *argv, check=False).stdout

    def healthy(self, vm: str) -> bool:
        """One QEMU, its TAP on the bridge, its firewall chains, its record; the daemon says Ready."""
        tap = tap_name(vm, "lan0")
        return (self.qemu(vm) is not None and "master br-chaos" in self.netns("ip", "-o", "link", "show", tap)
                and f"in-{tap}" in self.netns("nft", "list", "ruleset")
                and (self.host.state / "vms" / vm / "record.json").exists() and self.ready(vm))

    def ready(self, vm: str) -> bool:
        status = self.host.stored_status(vm)
        return status is not None and "Ready" in status.conditions and status.pid == self.qemu(vm)

    def failures_since(self, vm: str, moment: float) -> list[str]:
        """Failure events (of the VM, or of the network it is on) since ``moment``."""
        return [f"{e['vm']}: {e['message']}" for e in self.host.events()
                if e.get("result") == "failure" and e.get("vm") in (vm, "lan", "-")
                and e.get("kind") != "status-mirror"  # PostgreSQL's outage is not this fault's report
                and float(str(e.get("ts") or 0)) >= moment]

    # -- faults -----------------------------------------------------------------------------------------

    def kill_qemu(self, vm: str) -> str:
        pid = self.qemu(vm)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        self.expect = lambda: self.qemu(vm) not in (None, pid)
        wait_gone(pid)
        self.kills[vm] = self.kills.get(vm, 0) + 1
        return f"SIGKILL QEMU pid {pid}"

    def device_del(self, vm: str) -> str:
        async def unplug() -> None:
            deadline = time.monotonic() + 15
            while True:  # the monitor takes one client: retry while the daemon holds it
                try:
                    async with monitor.session(self.host.state / "vms" / vm / "run" / "qmp.sock") as qmp:
                        await qmp.execute("device_del", {"id": disk_node("data")})
                        return
                except MonitorError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        moment = time.time()
        asyncio.run(unplug())
        # Repaired: the daemon plugged it back (the guest may not even notice the gap), same QEMU, and the
        # guest sees its disk.
        pid, guest = self.qemu(vm), self.host.guest(vm)
        self.expect = lambda: self.qemu(vm) == pid and "vdb" in guest.reports(guest.boots())[-1].disks and any(
            e["kind"] == "hotplug-disk" and e["result"] == "ok" and float(str(e["ts"])) >= moment
            for e in self.host.events(vm))
        return "device_del of disk data over QMP"

    def delete_tap(self, vm: str) -> str:
        self.netns("ip", "link", "del", tap_name(vm, "lan0"))
        return f"deleted TAP {tap_name(vm, 'lan0')}"

    def delete_bridge(self, vm: str) -> str:
        self.netns("ip", "link", "del", "br-chaos")
        return "deleted bridge br-chaos"

    def flush_nft(self, vm: str) -> str:
        self.netns("nft", "flush", "ruleset")
        return "flushed the nftables ruleset"

    def delete_pidfile(self, vm: str) -> str:
        pid = self.qemu(vm)
        self.host.pidfile(vm).unlink(missing_ok=True)
        # Nothing to repair: the QEMU is still ours (launch.json names it). Two resyncs later it must still be
        # the only QEMU, not doubled by a start that takes it for gone.
        later = time.monotonic() + 2 * RESYNC + 1
        self.expect = lambda: time.monotonic() > later and self.host.qemu_pids(vm) == [pid]
        return "deleted the pidfile"

    def delete_record(self, vm: str) -> str:
        pid = self.qemu(vm)
        (self.host.state / "vms" / vm / "record.json").unlink(missing_ok=True)
        self.expect = lambda: self.host.qemu_pids(vm) == [pid]  # re-recorded, the running QEMU kept
        return "deleted record.json"

    def fill_fs(self, vm: str) -> str:
        filler = self.host.state / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "status=none"], check=False,
                       stderr=subprocess.DEVNULL)
        log = self.host.base / "sync.log"
        seen = log.stat().st_size
        self.kill_qemu(vm)
        try:  # with no room, the restart cannot write its records, nor the status store its events: the
            # daemon's log says so (the store is on the full file system too), and the VM is not half-started
            said = self.host.wait_for(lambda: _full(log.read_bytes()[seen:]), "the daemon reporting a full disk",
                                      timeout=REPAIR_TIMEOUT)
            assert self.host.qemu_pids(vm) == [], "no QEMU started half-way while the disk is full"
        finally:
            filler.unlink()
        self.reported_in_log = str(said)
        return "filled the state file system and killed QEMU (then freed it)"

    def pick(self, kill: bool = False) -> tuple[str, Callable[[str], str]]:
        """The next fault, and its VM; ``kill``: a SIGKILL if that VM may take one more (the seed's generator
        is drawn from all the same, so the faults after it are the seed's)."""
        vm = self.rng.choice(VMS)
        faults: list[Callable[[str], str]] = [self.device_del, self.delete_tap, self.delete_bridge, self.flush_nft,
                                              self.delete_pidfile, self.delete_record]
        if self.kills.get(vm, 0) < KILLS_PER_VM:
            faults += [self.kill_qemu, self.fill_fs]
        fault = self.rng.choice(faults)
        return vm, self.kill_qemu if kill and self.kill_qemu in faults else fault

    # -- PostgreSQL, where the daemon mirrors its statuses -------------------------------------------------

    def metric(self, series: str) -> float | None:
        """One series of the daemon's metrics (served inside the test's network namespace)."""
        text = self.netns("curl", "-sf", "--max-time", "5", f"http://{METRICS}/metrics")
        match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else None

    def mirror_said(self, result: str, moment: float) -> str:
        """The daemon's last ``status-mirror`` event with ``result`` since ``moment`` ("" if none)."""
        said = [str(e["message"]) for e in self.host.events("-") if e.get("kind") == "status-mirror"
                and e.get("result") == result and float(str(e.get("ts") or 0)) >= moment]
        return said[-1] if said else ""

    def mirrored(self) -> bool:
        """PostgreSQL's rows are the world: one per VM, each what the local store says, and that is the
        VM as it is: its running QEMU's PID, Ready."""
        import psycopg

        try:
            with psycopg.connect(self.pg.url, connect_timeout=2) as db:
                rows = {vm: (phase, pid, conditions) for vm, phase, pid, conditions in db.execute(
                    "SELECT vm, phase, pid, conditions FROM infinization_vm_status WHERE host = %s",
                    (store_host(None),))}
        except psycopg.Error:
            return False
        store = open_readonly(self.host.state / "infinization.db")
        if store is None:
            return False
        try:
            local = {vm: (s.phase, s.pid, s.conditions) for vm, s in store.statuses().items()}
        finally:
            store.close()
        return rows == local and set(rows) == set(VMS) and all(
            phase == "Running" and pid is not None and pid == self.qemu(vm) and "Ready" in conditions
            for vm, (phase, pid, conditions) in rows.items())

    def stop_postgres(self, mode: str) -> str:
        self.pg.stop(mode)
        self.pg_stops += 1
        return f"stopped PostgreSQL (pg_ctl stop -m {mode}) for the next {OUTAGE} faults"

    def start_postgres(self, stopped_at: float) -> str:
        """End the outage: the daemon must have reported it; then the mirror catches up."""
        said = self.host.wait_for(
            lambda: self.metric("infinization_status_mirror_up") == 0 and self.mirror_said("failure", stopped_at),
            "the daemon reporting PostgreSQL down", timeout=REPAIR_TIMEOUT)
        self.pg.start()
        began = time.monotonic()
        self.host.wait_for(lambda: self.mirrored() and self.metric("infinization_status_mirror_up") == 1
                           and self.mirror_said("ok", stopped_at), "the mirror to catch up", timeout=CATCH_UP)
        return f"reported ({str(said)[:90]}); started again, caught up in {time.monotonic() - began:.1f}s"


def _inject(chaos: Chaos, number: int, vm: str, fault: Callable[[str], str], seed: int) -> None:
    """One fault, then its repair (or, failing that, its report), printed on one line."""
    host = chaos.host
    booted, pid = host.guest(vm).boots(), chaos.qemu(vm)
    moment = time.time()
    chaos.reported_in_log = ""
    chaos.expect = lambda: True
    what = fault(vm)
    chaos.injected += 1
    try:
        host.wait_for(lambda: chaos.healthy(vm) and chaos.expect(), f"{vm} repaired", timeout=REPAIR_TIMEOUT)
    except AssertionError:
        failures = chaos.failures_since(vm, moment)
        assert failures, f"fault {number} ({what} on {vm}, seed {seed}): neither repaired nor reported"
        chaos.reported += 1
        print(f"  {number:2}. {vm}: {what} -> reported: {failures[-1][:150]}")
        return
    if chaos.qemu(vm) != pid:  # restarted: let its guest boot before the next fault (a device_del
        # needs a guest that answers the hot-unplug)
        host.guest(vm).wait_report(lambda r: "vdb" in r.disks, what=f"{vm} booted again", timeout=BOOT,
                                   boot=booted + 1)
    reported = chaos.failures_since(vm, moment) + ([chaos.reported_in_log] if chaos.reported_in_log else [])
    chaos.reported += bool(reported)
    chaos.repaired += 1
    print(f"  {number:2}. {vm}: {what} -> repaired" + (f" (reported first: {reported[-1][:100]})"
                                                     if reported else ""))


def test_chaos_faults_with_the_daemon_running_are_repaired_or_reported(
        net_host: Host, postgres_server: PostgresServer) -> None:
    host = net_host
    seed = int(os.environ.get("INFZ_CHAOS_SEED") or random.randrange(1 << 32))
    count = int(os.environ.get("INFZ_CHAOS_FAULTS", "10"))
    outage = random.Random(f"{seed}/postgresql")  # its own generator: the other faults stay the seed's
    outage_at, mode = outage.randint(1, max(1, count - OUTAGE + 1)), outage.choice(("fast", "immediate"))
    print(f"\nchaos seed {seed} ({count} faults and a PostgreSQL stop before fault {outage_at}): "
          f"replay with INFZ_CHAOS_SEED={seed}")
    chaos = Chaos(host, random.Random(seed), postgres_server)
    database = host.base / "database.url"  # the daemon's DSN, as an operator gives it: a file only root reads
    database.touch(mode=0o600)
    database.write_text(postgres_server.url + "\n")
    host.state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m,mode=0700", "infz-chaos", str(host.state)], check=True)
    daemon = None
    try:
        host.write("net.yaml", NETWORK)
        for index, vm in enumerate(VMS, start=1):
            host.write(f"{vm}.yaml", _vm(vm, index))
        daemon = host.start_sync("--allow-restart", "--database-file", str(database), "--metrics-address", METRICS)
        for vm in VMS:
            host.wait_for(lambda vm=vm: chaos.healthy(vm), f"{vm} running", timeout=90)
            host.guest(vm).wait_report(lambda r: "vdb" in r.disks, what=f"{vm} boot", timeout=BOOT)
        host.wait_for(chaos.mirrored, "the statuses in PostgreSQL", timeout=CATCH_UP)

        number, stopped_at = 0, 0.0
        for index in range(1, count + 1):
            if index == outage_at:
                number += 1
                stopped_at = time.time()
                print(f"  {number:2}. PostgreSQL: {chaos.stop_postgres(mode)}")
                chaos.injected += 1
            vm, fault = chaos.pick(kill=index == outage_at)  # a VM killed while PostgreSQL is down
            number += 1
            _inject(chaos, number, vm, fault, seed)
            if index == min(count, outage_at + OUTAGE - 1):
                print(f"      PostgreSQL: {chaos.start_postgres(stopped_at)}")
                chaos.reported += 1
                chaos.repaired += 1
        print(f"chaos seed {seed}: injected {chaos.injected} ({chaos.pg_stops} PostgreSQL stop), "
              f"repaired {chaos.repaired}, reported {chaos.reported}")

        for vm in VMS:  # the end state: every VM back, its guest booted, disks both seen, PostgreSQL told
            host.wait_for(lambda vm=vm: chaos.healthy(vm), f"{vm} healthy at the end", timeout=90)
            host.guest(vm).wait_report(lambda r: {"vda", "vdb"} <= set(r.disks), what=f"{vm} with both disks",
                                       boot=host.guest(vm).boots())
        host.wait_for(chaos.mirrored, "the statuses in PostgreSQL at the end", timeout=CATCH_UP)
        assert host.stop_sync(daemon) == 0
        daemon = None
        assert host.plan_exit() == 0, host.cli("plan", str(host.manifests)).stdout
        assert chaos.pg_stops == 1 and chaos.injected == count + 1
        assert chaos.repaired + chaos.reported >= count + 1
    finally:
        if daemon is not None:
            host.stop_sync(daemon)
        host.kill_all()
        for vm in VMS:
            for pid in host.qemu_pids(vm):
                wait_gone(pid)
        with contextlib.suppress(Exception):
            Path(host.state / "filler").unlink(missing_ok=True)
        subprocess.run(["umount", "-l", str(host.state)], check=False)
