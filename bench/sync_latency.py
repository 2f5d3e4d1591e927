#!/usr/bin/env python3
"""Benchmark: how fast `infinization sync` turns a manifest edit into a change on the host.

Measured in one run, against a raw-QEMU floor measured the same way on the same machine:

- live disk grow: time from writing the manifest to the `grow-disk-live` step being done (its event
  timestamp in the daemon's store), versus one `block_resize` sent straight over QMP to a raw QEMU;
- new VM: time from writing a new manifest to its QEMU answering `query-status` as running, versus
  `qemu-system-x86_64 -daemonize` + the first QMP answer for the same argv.

Prints a table (p50, p95, ratio to the floor). Run as root after scripts/setup.sh:
    python bench/sync_latency.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reconciler.observe import monitor  # noqa: E402
from tests.e2e.harness import vm_manifest  # noqa: E402

MiB = 1024**2


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait(predicate, timeout: float = 60.0, step: float = 0.002):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError


def event_time(db: Path, vm: str, kind: str, after: float) -> float | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT ts FROM events WHERE vm = ? AND kind = ? AND result = 'ok' AND ts > ? "
                           "ORDER BY id LIMIT 1", (vm, kind, after)).fetchone()
    return row[0] if row else None


async def qmp_running(sock: Path) -> bool:
    try:
        async with monitor.session(sock, timeout=0.5) as qmp:
            return (await qmp.execute("query-status"))["status"] == "running"
    except monitor.MonitorError:
        return False


def raw_floor(base: Path, rounds: int) -> tuple[list[float], list[float]]:
    """block_resize over an open QMP session, and daemonize-to-QMP-ready, on a raw QEMU."""
    disk = base / "raw.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    starts: list[float] = []
    for i in range(rounds):
        sock, pidfile = base / f"raw{i}.sock", base / f"raw{i}.pid"
        argv = ["qemu-system-x86_64", "-nodefaults", "-machine", "q35", "-accel", "tcg", "-display", "none",
                "-qmp", f"unix:{sock},server=on,wait=off", "-pidfile", str(pidfile), "-daemonize"]
        began = time.monotonic()
        subprocess.run(argv, check=True)
        wait(lambda s=sock: asyncio.run(qmp_running(s)))
        starts.append(time.monotonic() - began)
        os.kill(int(pidfile.read_text()), signal.SIGKILL)

    resizes: list[float] = []
    sock, pidfile = base / "rawd.sock", base / "rawd.pid"
    subprocess.run(["qemu-system-x86_64", "-nodefaults", "-machine", "q35", "-accel", "tcg", "-display", "none",
                    "-qmp", f"unix:{sock},server=on,wait=off", "-pidfile", str(pidfile), "-daemonize",
                    "-blockdev", f'{{"driver":"file","node-name":"f","filename":"{disk}"}}',
                    "-blockdev", '{"driver":"qcow2","node-name":"d","file":"f"}'], check=True)

    async def resize_all() -> None:
        async with monitor.session(sock) as qmp:
            for i in range(rounds):
                began = time.monotonic()
                await qmp.execute("block_resize", {"node-name": "d", "size": (65 + i) * MiB})
                resizes.append(time.monotonic() - began)
    asyncio.run(resize_all())
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    return resizes, starts


def infinization(base: Path, rounds: int) -> tuple[list[float], list[float]]:
    manifests, state = base / "m", base / "st"
    manifests.mkdir()
    env = dict(os.environ, INFINIZATION_STATE_DIR=str(state))
    daemon = subprocess.Popen([sys.executable, "-m", "reconciler", "sync", str(manifests), "--metrics-address",
                               "none", "--debounce-ms", "10"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        db = state / "infinization.db"
        creates: list[float] = []
        for i in range(rounds):
            name = f"b{i}"
            began = time.monotonic()
            (manifests / f"{name}.yaml").write_text(vm_manifest(name))
            wait(lambda n=name: asyncio.run(qmp_running(state / "vms" / n / "run" / "qmp.sock")), step=0.005)
            creates.append(time.monotonic() - began)
        # Let the guests finish booting (TCG on 2 cores): the grow rounds should measure the reconciler,
        # not CPU contention with booting kernels. Then keep only one VM.
        for i in range(rounds):
            wait(lambda n=i: "INFZ-BOOTED" in (state / "vms" / f"b{n}" / "run" / "serial.log").read_text(
                errors="replace"))
        for i in range(1, rounds):
            (manifests / f"b{i}.yaml").unlink()
        wait(lambda: not any((state / "vms" / f"b{i}").exists() for i in range(1, rounds)))
        grows: list[float] = []
        for i in range(rounds):
            wall = time.time()
            began = time.monotonic()
            (manifests / "b0.yaml").write_text(vm_manifest("b0", disks=f"    - {{name: root, size: {65 + i}Mi}}"))
            done = wait(lambda w=wall: event_time(db, "b0", "grow-disk-live", w), step=0.005)
            grows.append(done - wall)
            del began
            time.sleep(0.3)  # one edit at a time: latency, not throughput
        return grows, creates
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        for pidfile in state.glob("vms/*/run/qemu.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="infz-bench-", dir="/tmp"))
    try:
        raw_resize, raw_start = raw_floor(base, args.rounds)
        grow, create = infinization(base, args.rounds)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = [
        ("manifest edit -> disk grown live", grow, "QMP block_resize (open session)", raw_resize),
        ("new manifest -> VM running", create, "qemu -daemonize -> QMP running", raw_start),
    ]
    print(f"{'operation (infinization sync)':36} {'p50 ms':>8} {'p95 ms':>8}   {'raw-QEMU floor':32} "
          f"{'p50 ms':>8} {'ratio p50':>9}")
    for label, values, floor_label, floor in rows:
        p50, p95, f50 = pct(values, 0.5) * 1000, pct(values, 0.95) * 1000, pct(floor, 0.5) * 1000
        print(f"{label:36} {p50:8.1f} {p95:8.1f}   {floor_label:32} {f50:8.2f} {p50 / f50:9.1f}")
    print(f"rounds: {args.rounds}; mean grow {statistics.mean(grow) * 1000:.1f} ms, "
          f"mean create {statistics.mean(create) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
