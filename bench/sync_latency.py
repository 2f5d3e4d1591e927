"""Benchmark scenario: how fast `infinization sync` turns a manifest edit into a change in the guest.

Called by ``bench/__main__.py`` (``python -m bench``; alone: ``python -m bench.sync_latency``). The edit
grows VM ``s0``'s disk; the latency is from writing the manifest to the daemon's ``grow-disk-live`` event
being recorded as done (its timestamp in the daemon's store). The floor, in the same run: one
``block_resize`` sent over an already open QMP session to a raw QEMU. Measured with 1 VM and with
``many`` VMs running under the same daemon: the latency must not grow with the host's VM count.

Also a VM created by the daemon: a new manifest written to the daemon's ``start`` event (the QEMU answers
``running``), against the raw floor of ``apply: create 1 VM`` (``qemu-img create`` + QEMU + QMP running):
what creating one VM costs where no interpreter has to start first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sqlite3
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import PYTHON, ROOT, RawFleet, Row, Sandbox, wait_for
from reconciler.adapters import monitor

MiB = 1024**2


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _event_time(db: Path, vm: str, kind: str, after: float) -> float | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT ts FROM events WHERE vm = ? AND kind = ? AND result = 'ok' AND ts > ? "
                           "ORDER BY id LIMIT 1", (vm, kind, after)).fetchone()
    return float(row[0]) if row else None


def raw_resize(base: Path, rounds: int) -> list[float]:
    """``block_resize`` over an open QMP session to a raw QEMU, ``rounds`` times (seconds each)."""
    disk, sock, pidfile = base / "raw.qcow2", base / "raw.sock", base / "raw.pid"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    subprocess.run(["qemu-system-x86_64", "-nodefaults", "-machine", "q35,accel=tcg", "-display", "none",
                    "-qmp", f"unix:{sock},server=on,wait=off", "-pidfile", str(pidfile), "-daemonize",
                    "-blockdev", f"driver=file,node-name=f,filename={disk}",
                    "-blockdev", "driver=qcow2,node-name=d,file=f"], check=True)
    resizes: list[float] = []

    async def resize_all() -> None:
        async with monitor.session(sock) as qmp:
            for i in range(rounds):
                began = time.monotonic()
                await qmp.execute("block_resize", {"node-name": "d", "size": (65 + i) * MiB})
                resizes.append(time.monotonic() - began)
    try:
        asyncio.run(resize_all())
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    return resizes


@contextlib.contextmanager
def _daemon(label: str, names: list[str]) -> Iterator[tuple[Sandbox, Path]]:
    """A sandbox whose VMs ``names`` were applied and booted, under a running sync daemon past its first
    full reconcile; the sandbox and the daemon's store. Stopped (SIGTERM) and cleaned up on exit."""
    box = Sandbox(label)
    daemon = None
    try:
        box.write_vms(names)
        box.cli("apply", str(box.manifests), "--yes")
        box.wait_booted(names)
        daemon = subprocess.Popen([PYTHON, "-m", "reconciler", "sync", str(box.manifests), "--metrics-address",
                                   "none"], cwd=ROOT, env=box.env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        db = box.state / "infinization.db"
        wait_for(db.exists, timeout=120, step=0.05)
        time.sleep(3.0)  # the first full reconcile is not what is measured
        yield box, db
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
        box.close()


def daemon_grow(count: int, rounds: int) -> list[float]:
    """Edit-to-grown latencies (seconds) with ``count`` VMs under one sync daemon."""
    grows = []
    with _daemon(f"sync{count}", [f"s{i}" for i in range(count)]) as (box, db):
        for i in range(rounds):
            wall = time.time()
            box.write_vms(["s0"], disks=f"    - {{name: root, size: {65 + i}Mi}}")
            done = wait_for(lambda w=wall: _event_time(db, "s0", "grow-disk-live", w), timeout=60, step=0.002)
            grows.append(done - wall)
            time.sleep(0.3)  # one edit at a time: latency, not throughput
    return grows


def daemon_create(rounds: int) -> list[float]:
    """New-manifest-to-running latencies (seconds) under a sync daemon that holds one running VM: each round
    writes ``n{i}.yaml``, waits for its ``start`` event, for its guest's boot (so the next round does not
    compete with a booting guest), then removes the manifest and waits until the VM is gone."""
    creates = []
    with _daemon("synccreate", ["s0"]) as (box, db):
        for i in range(rounds):
            name = f"n{i}"
            wall = time.time()
            box.write_vms([name])
            done = wait_for(lambda w=wall, n=name: _event_time(db, n, "start", w), timeout=120, step=0.002)
            creates.append(done - wall)
            box.wait_booted([name])
            (box.manifests / f"{name}.yaml").unlink()
            wait_for(lambda n=name: not (box.state / "vms" / n).exists(), timeout=120, step=0.05)
            time.sleep(0.5)
    return creates


def raw_create(rounds: int) -> list[float]:
    """The create floor, one raw VM at a time (as ``scenarios.create_and_stop`` measures it)."""
    took = []
    for _ in range(rounds):
        box = Sandbox("syncrawcreate")
        raw = RawFleet(box.base, 1)
        try:
            took.append(raw.start())
        finally:
            raw.kill()
            box.close()
    return took


def create_rows(rounds: int) -> list[Row]:
    floor = statistics.median(raw_create(rounds))
    ours = daemon_create(rounds)
    return [Row("sync: new manifest -> VM running, p50, 1 VM", pct(ours, 0.5), floor, "<= 1.5x floor (create 1)"),
            Row("sync: new manifest -> VM running, p90, 1 VM", pct(ours, 0.9), floor, "-")]


def rows(many: int, rounds: int) -> list[Row]:
    box = Sandbox("syncraw")
    try:
        floor = statistics.median(raw_resize(box.base, rounds))
    finally:
        box.close()
    one_all, lots_all = daemon_grow(1, rounds), daemon_grow(many, rounds)
    created = create_rows(max(3, rounds // 2))
    one, lots = pct(one_all, 0.5), pct(lots_all, 0.5)
    return [Row("sync: edit -> disk grown live, p50, 1 VM", one * 1000, floor * 1000, "<= floor + 30 ms", unit="ms"),
            Row("sync: edit -> disk grown live, p90, 1 VM", pct(one_all, 0.9) * 1000, floor * 1000, "-", unit="ms"),
            Row(f"sync: edit -> disk grown live, p50, {many} VMs (floor: 1 VM)", lots * 1000, one * 1000,
                "<= 1.2x", unit="ms"),
            Row(f"sync: edit -> disk grown live, p90, {many} VMs (floor: 1 VM p90)", pct(lots_all, 0.9) * 1000,
                pct(one_all, 0.9) * 1000, "-", unit="ms"),
            *created]


def main() -> int:
    from bench.common import print_table
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--vms", type=int, default=25)
    parser.add_argument("--create-only", action="store_true", help="only the new-manifest-to-running rows")
    args = parser.parse_args()
    print_table(create_rows(args.rounds) if args.create_only else rows(args.vms, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
