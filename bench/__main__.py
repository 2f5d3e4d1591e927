"""``python -m bench``: run every scenario and print one table (ours, the raw floor of the same run, ratio,
target). ``--quick`` runs small sizes (a few minutes); the full run uses the sizes of issue 13 (N = 1, 16,
32 VMs; 25 VMs for the flatness scenarios). ``--only`` picks scenarios by name. Run as root, on a host
set up by scripts/setup.sh, with the test guest built (the benchmark boots it under TCG).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench import scenarios, sync_latency
from bench.common import PYTHON, Row, print_table

SCENARIOS = ("create", "plan", "startup", "sync", "idle")


def _machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    python = subprocess.run([PYTHON, "--version"], capture_output=True, text=True).stdout.strip()
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, {platform.release()}, {qemu}, {python}, "
            f"load average at start {loadavg}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one round each")
    parser.add_argument("--only", nargs="*", choices=SCENARIOS, help="run only these scenarios")
    parser.add_argument("--sizes", type=int, nargs="*", help="the N of `create N VMs` (default 1 16 32)")
    parser.add_argument("--many", type=int, help="VMs for the flatness scenarios (default 25; quick: 8)")
    parser.add_argument("--idle-resync", type=float, metavar="SECONDS",
                        help="the idle daemon's --resync-interval (default: the daemon's own, 600 s)")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the create scenario, keep the median")
    args = parser.parse_args()
    chosen = set(args.only or SCENARIOS)
    sizes = args.sizes or ([1, 4] if args.quick else [1, 16, 32])
    many = args.many or (8 if args.quick else 25)
    rounds = 3 if args.quick else 7
    print(_machine(), flush=True)
    began = time.monotonic()
    rows: list[Row] = []
    runs: list[tuple[str, Callable[[], list[Row]]]] = []
    if "startup" in chosen:
        runs.append(("startup", lambda: scenarios.startup(rounds)))
    if "plan" in chosen:
        runs.append(("plan", lambda: scenarios.plan_flat(1, many, rounds)))
    if "create" in chosen:
        runs += [(f"create {count}", functools.partial(scenarios.create_and_stop, count, args.repeat))
                 for count in sizes]
    if "sync" in chosen:
        runs.append(("sync", lambda: sync_latency.rows(many, 5 if args.quick else 10)))
    if "idle" in chosen:
        runs.append(("idle", lambda: scenarios.idle_daemon(args.many or (8 if args.quick else 100),
                                                             10.0 if args.quick else 30.0, paused=True,
                                                             resync=args.idle_resync)))
    for name, run in runs:
        # One scenario failing (a guest that does not boot within the deadline on an overloaded host) must
        # not lose the rows of the others: each row is printed as soon as it is measured.
        try:
            done = run()
        except Exception as exc:  # reported, and the next scenario runs
            print(f"scenario {name} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        for row in done:
            print(f"measured: {row.scenario}: ours {row.ours:.3f}, floor {row.floor}, ratio {row.ratio}", flush=True)
        rows += done
    print()
    print_table(rows)
    print(f"\n(total {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
