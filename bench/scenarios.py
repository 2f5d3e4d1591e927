"""The benchmark's scenarios: each returns table rows, ours next to the floor measured in the same run.

Called by ``bench/__main__.py``. Every scenario drives the real CLI on a ``common.Sandbox`` and cleans up
after itself (QEMUs killed, sandbox removed), whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import PYTHON, ROOT, RawFleet, Row, Sandbox, wait_for

TARGET_CREATE = "<= 1.5x floor"
DEFAULT_RESYNC = 600.0  # the sync daemon's --resync-interval default (reconciler/cli/parser.py)


def create_and_stop(count: int, repeat: int = 1) -> list[Row]:
    """``apply`` creating ``count`` VMs from nothing, against the raw fleet started the same way; then,
    once every guest has booted, ``runStrategy: Halted`` for all of them against the raw fleet's
    concurrent ACPI power-off."""
    ours_create, raw_create, ours_stop, raw_stop = [], [], [], []
    for _ in range(repeat):
        box, raw = Sandbox(f"create{count}"), RawFleet(Path(), count)
        raw.base = box.base / "raw"
        try:
            names = [f"b{i}" for i in range(count)]
            # One fleet at a time, each alone on the machine: the raw fleet is created, boots and is powered
            # off before ours is created (an idle booted TCG guest still takes a few % of a core, and a
            # booting one a whole core: left running, the raw fleet would take CPU from ours).
            raw_create.append(raw.start())
            raw.wait_booted()
            raw_stop.append(raw.power_off())
            raw.kill()
            box.write_vms(names)
            took, _ = box.cli("apply", str(box.manifests), "--yes")
            ours_create.append(took)
            box.wait_booted(names)
            box.write_vms(names, run_strategy="Halted")
            took, _ = box.cli("apply", str(box.manifests), "--yes")
            ours_stop.append(took)
        finally:
            raw.kill()
            box.close()
    create, stop = statistics.median(ours_create), statistics.median(ours_stop)
    return [Row(f"apply: create {count} VM(s) (to QMP running)", create, statistics.median(raw_create),
                TARGET_CREATE),
            Row(f"apply: runStrategy Halted for {count} booted VM(s)", stop, statistics.median(raw_stop),
                "~ the longest single shutdown")]


def plan_flat(few: int, many: int, rounds: int) -> list[Row]:
    """A no-op ``plan`` with ``few`` running VMs against one with ``many`` (the floor here is the few)."""
    times: dict[int, float] = {}
    cpus: dict[int, float] = {}
    box = Sandbox("plan")
    try:
        for count in (few, many):
            names = [f"p{i}" for i in range(count)]
            box.write_vms(names)
            box.cli("apply", str(box.manifests), "--yes")
            box.wait_booted(names)  # quiet guests: measure the reconciler, not the boots around it
            box.cli("plan", str(box.manifests))  # not measured: writes this tree's bytecode, as installing would
            samples = [(box.cli("plan", str(box.manifests), "--detailed-exitcode")[0], box.last_cpu)
                       for _ in range(rounds)]
            times[count] = statistics.median(w for w, _ in samples)
            cpus[count] = statistics.median(c for _, c in samples)
        return [Row(f"no-op plan, {many} running VMs (floor: {few} VM)", times[many], times[few], "<= 1.5x"),
                Row(f"no-op plan, {few} running VM", times[few], None, "< 0.4 s on an idle machine"),
                Row(f"  its CPU, user+sys (cpu/wall {cpus[few] / times[few]:.2f})", cpus[few], None,
                    "< 0.4 s (load-proof)")]
    finally:
        box.close()


_IMPORT = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def _import_total(stderr: str) -> tuple[float, int]:
    """The cumulative import time of top-level imports (microseconds to seconds) and how many modules."""
    total, modules = 0, 0
    for match in _IMPORT.finditer(stderr):
        modules += 1
        if len(match.group(3)) == 1:  # one space: a top-level import (nested ones are indented further)
            total += int(match.group(2))
    return total / 1e6, modules


def startup(rounds: int) -> list[Row]:
    """Each command's wall time against a bare ``python -c pass`` (the interpreter's own floor), the
    import time ``python -X importtime`` reports for it, and its CPU time (user + system) against the
    floor's. On a shared, loaded machine the CPU time stays close to what an idle machine shows while the
    wall time stretches; the row's cpu/wall says how much of its wall time the command had a core (about
    1.0 on an idle machine)."""
    box = Sandbox("startup")
    rows = []
    try:
        box.write_vms(["s0"], run_strategy="Halted")
        box.cli("apply", str(box.manifests), "--yes")
        floor = [_bare_python() for _ in range(rounds)]
        floor_wall, floor_cpu = statistics.median(w for w, _ in floor), statistics.median(c for _, c in floor)
        for args in (("--version",), ("validate", str(box.manifests)), ("status",),
                     ("plan", str(box.manifests))):
            box.cli(*args)  # not measured: writes this tree's bytecode, as installing it would
            samples = [(box.cli(*args)[0], box.last_cpu) for _ in range(rounds)]
            wall, cpu = statistics.median(w for w, _ in samples), statistics.median(c for _, c in samples)
            imports, modules = _import_total(box.cli(*args, python_flags=("-X", "importtime"))[1])
            target = "< 0.4 s" if args[0] == "plan" else "imports only what it uses"
            rows.append(Row(f"CLI {args[0]} (imports {imports:.2f} s, {modules} modules)", wall, floor_wall, target))
            rows.append(Row(f"  CLI {args[0]}: CPU user+sys (cpu/wall {cpu / wall:.2f})", cpu, floor_cpu,
                            "CPU of python -c pass"))
    finally:
        box.close()
    return rows


def _bare_python() -> tuple[float, float]:
    """``python -c pass``: its wall time and CPU time (user + system)."""
    began, usage = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([PYTHON, "-c", "pass"], check=True, cwd=ROOT)
    took, after = time.monotonic() - began, resource.getrusage(resource.RUSAGE_CHILDREN)
    return took, (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _status(box: Sandbox) -> list[dict[str, Any]]:
    done = subprocess.run([PYTHON, "-m", "reconciler", "status", "--json"], capture_output=True, text=True,
                          env=box.env(), cwd=ROOT, check=True, timeout=600)
    rows: list[dict[str, Any]] = json.loads(done.stdout)["vms"]
    return rows


def _phases(box: Sandbox) -> dict[str, int]:
    """How many VMs `status --json` shows in each phase."""
    phases: dict[str, int] = {}
    for row in _status(box):
        phases[row["phase"]] = phases.get(row["phase"], 0) + 1
    return phases


def idle_daemon(count: int, window: float, paused: bool, resync: float | None = None) -> list[Row]:
    """The sync daemon's CPU and resident memory over ``window`` seconds while it holds ``count`` VMs
    (paused when ``paused``: ``spec.paused``), after they have all converged."""
    box = Sandbox("idle")
    daemon = None
    try:
        names = [f"i{i}" for i in range(count)]
        # Many QEMUs starting at once on a loaded 2-core machine can take longer than 30 s to answer QMP.
        box.config.write_text(box.config.read_text() + "startTimeout: 120\n")
        # Paused VMs start with -S: their guest never runs, and QEMU touches little of its RAM.
        if paused:
            box.write_vms(names, extra="  paused: true\n", memory="128Mi")
        else:
            box.write_vms(names)
        if paused and box.cli("validate", str(box.manifests), check=False)[1]:
            paused = False  # this tree has no spec.paused: hold them running (and booted) instead
            box.write_vms(names)
        want = "Paused" if paused else "Running"
        for _ in range(3):  # a start can time out on a loaded shared machine: apply converges when re-run
            box.cli("apply", str(box.manifests), "--yes", check=False)
            if (phases := _phases(box)).get(want) == count:
                break
        else:
            raise RuntimeError(f"not every VM is {want}: {phases}")
        if not paused:
            box.wait_booted(names)
        extra = ["--resync-interval", f"{resync:g}"] if resync is not None else []
        launched = time.time()  # `apply` records status rows too: only the daemon's own, newer rows count
        daemon = subprocess.Popen([PYTHON, "-m", "reconciler", "sync", str(box.manifests), "--metrics-address",
                                   "none", *extra], cwd=ROOT, env=box.env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        # Converged: a first full reconcile has passed (status written for every VM).
        wait_for(lambda: (box.state / "infinization.db").exists(), timeout=120, step=0.1)
        wait_for(lambda: _reported_since(box, launched), timeout=900, step=2.0)
        time.sleep(5.0)  # settle: the first resync and listeners' connects are not idle time
        cpu0, began = _cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(window)
        cpu = (_cpu_seconds(daemon.pid) - cpu0) / (time.monotonic() - began) * 100
        rss = _rss_mb(daemon.pid)
        # One full resync pass (SIGHUP runs it now): its CPU, from the signal until every VM is reported again.
        asked, cpu0 = time.time(), _cpu_seconds(daemon.pid)
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: _reported_since(box, asked), timeout=900, step=0.5)
        pass_cpu = _cpu_seconds(daemon.pid) - cpu0
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=60)
        box.close()
    period = resync if resync is not None else DEFAULT_RESYNC
    what = f"{count} {'paused' if paused else 'running'} VMs"
    return [Row(f"idle sync daemon CPU between resyncs, {what}", cpu, None, "< 1 % of a core", unit="%"),
            Row(f"one full resync pass, {what} (CPU seconds)", pass_cpu, None, "-", unit="s"),
            Row(f"idle CPU averaged over a {period:g} s resync period, {what}", cpu + pass_cpu / period * 100, None,
                "< 1 % of a core", unit="%"),
            Row(f"idle sync daemon RSS, {what}", rss, 73.0, "< libvirtd+virtlogd (73 MB)", unit="MB")]


def _reported_since(box: Sandbox, since: float) -> bool:
    """Every VM's status row was written by a reconcile after ``since``."""
    return all((row["lastReconcile"] or 0) > since for row in _status(box))


