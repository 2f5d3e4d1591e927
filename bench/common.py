"""What the benchmark scenarios share: a sandboxed installation, a raw-QEMU floor, polls, and the table.

Used by ``bench/__main__.py`` and every scenario module. A ``Sandbox`` is one isolated reconciler (its
own state directory, manifest directory and host policy under /tmp), driven through the real CLI
(``python -m reconciler`` from this tree), like a user would. ``RawFleet`` is the floor: the same
guests as the manifests describe, started with nothing but ``qemu-img`` and ``qemu-system-x86_64
-daemonize``, all at once, and watched over QMP. Times are wall-clock (``time.monotonic``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from reconciler.adapters import monitor, procfs, qmpwire  # noqa: E402
from tests.e2e.harness import GUEST_DIR, vm_manifest  # noqa: E402

PYTHON = sys.executable
BOOTED = "INFZ-BOOTED"


@dataclass
class Row:
    """One line of the table: a scenario, our time, the floor measured in the same run, and the target."""

    scenario: str
    ours: float
    floor: float | None
    target: str
    unit: str = "s"
    ratio_of: Callable[[Row], float | None] | None = None  # default: ours / floor

    @property
    def ratio(self) -> float | None:
        if self.ratio_of is not None:
            return self.ratio_of(self)
        return self.ours / self.floor if self.floor else None


def print_table(rows: list[Row]) -> None:
    head = f"{'scenario':52} {'ours':>10} {'raw floor':>10} {'ratio':>7}  target"
    print(head)
    print("-" * len(head))
    for row in rows:
        floor = "-" if row.floor is None else _fmt(row.floor, row.unit)
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
        print(f"{row.scenario:52} {_fmt(row.ours, row.unit):>10} {floor:>10} {ratio:>7}  {row.target}")


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:.1f} {unit}"


def wait_for(predicate: Callable[[], Any], timeout: float = 120.0, step: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout:g}s")


def booted(serial: Path) -> bool:
    try:
        return BOOTED in serial.read_text(errors="replace")
    except OSError:
        return False


async def qmp_status(sock: Path) -> str | None:
    try:
        async with monitor.session(sock, timeout=1.0) as qmp:
            return str((await qmp.execute("query-status")).get("status"))
    except (monitor.MonitorError, OSError):
        return None


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (what ``apply`` waits for too): a daemonized QEMU that exited stays a zombie
    until PID 1 reaps it, which ``kill(pid, 0)`` cannot tell from a running one."""
    return procfs.is_alive(pid)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Sandbox:
    """One isolated reconciler installation under a short /tmp path (cleaned up by ``close``)."""

    last_cpu = 0.0

    def __init__(self, label: str) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"infz-bench-{label}-", dir="/tmp"))
        self.base.chmod(0o711)  # QEMU's unprivileged user traverses it to reach its run directory
        self.state = self.base / "st"
        self.manifests = self.base / "m"
        self.manifests.mkdir()
        self.config = self.base / "config.yaml"
        self.config.write_text(f"storageRoots: [{self.base}, {GUEST_DIR}]\nportForwardRange: 10000-20000\n")

    def env(self) -> dict[str, str]:
        env = dict(os.environ, INFINIZATION_STATE_DIR=str(self.state), INFINIZATION_CONFIG=str(self.config),
                   NO_COLOR="1", COLUMNS="200")
        # An installed infinization has its bytecode (pip compiles it): a shell's PYTHONDONTWRITEBYTECODE would
        # make every run compile this tree's ~150 modules again (~0.2 s of CPU), which no user pays.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        return env

    def write_vms(self, names: list[str], **manifest: Any) -> None:
        for name in names:
            (self.manifests / f"{name}.yaml").write_text(vm_manifest(name, **manifest))

    def cli(self, *args: str, check: bool = True, python_flags: tuple[str, ...] = ()) -> tuple[float, str]:
        """Run ``infinization ARGS``; its wall time and stderr (its CPU time, user + system, of the process
        and of the processes it waited for, is left in ``last_cpu``: load on a shared machine stretches
        wall time far more than CPU time)."""
        began, cpu = time.monotonic(), _children_cpu()
        done = subprocess.run([PYTHON, *python_flags, "-m", "reconciler", *args], capture_output=True, text=True,
                              env=self.env(), cwd=ROOT, stdin=subprocess.DEVNULL, timeout=900, check=False)
        took = time.monotonic() - began
        self.last_cpu = _children_cpu() - cpu
        if check and done.returncode not in (0, 2):
            raise RuntimeError(f"infinization {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
        return took, done.stderr

    def serial(self, vm: str) -> Path:
        return self.state / "vms" / vm / "run" / "serial.log"

    def wait_booted(self, names: list[str], timeout: float = 600.0) -> None:
        wait_for(lambda: all(booted(self.serial(name)) for name in names), timeout=timeout, step=0.2)

    def qemu_pids(self) -> list[int]:
        pids = []
        for pidfile in self.state.glob("vms/*/run/qemu.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(pidfile.read_text()))
        return pids

    def close(self) -> None:
        """Kill what is left (fast: no graceful stop), let apply forget it, and remove the sandbox."""
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for manifest in self.manifests.glob("*.yaml"):
            manifest.unlink()
        with contextlib.suppress(Exception):
            self.cli("apply", str(self.manifests), "--yes", "--allow-empty", check=False)
        shutil.rmtree(self.base, ignore_errors=True)


@dataclass
class RawFleet:
    """The floor: N guests with no reconciler, each ``qemu-img create`` + ``qemu-system-x86_64 -daemonize``
    + QMP answering "running", all N concurrently (what a hand-written script at its fastest would do)."""

    base: Path
    count: int
    pids: list[int] = field(default_factory=list)

    def _argv(self, i: int) -> list[str]:
        """The machine ours launches for the bench's manifest (q35, the disk and the NIC each on a PCIe root
        port, four spare ports for hot-plug, a virtio-scsi controller, virtio-rng), without the reconciler's
        extras (sandbox, second monitor, fd passing, cgroups). The same device model matters: the spare root
        ports alone make the test guest's power-off ~0.1 s longer (Linux's pciehp at shutdown), which 32
        guests shutting down at once on 2 cores turn into seconds."""
        run = self.base / f"raw{i}"
        ports = [arg for n, port in enumerate(["rp-disk", "rp-nic", "hp-0", "hp-1", "hp-2", "hp-3"])
                 for arg in ("-device", f"pcie-root-port,id={port},chassis={n + 1},bus=pcie.0")]
        return ["qemu-system-x86_64", "-nodefaults", "-machine", "q35,accel=tcg", "-smp", "1",
                "-m", "256M", "-display", "none", "-vga", "none", "-kernel", str(GUEST_DIR / "vmlinuz"),
                "-initrd", str(GUEST_DIR / "initrd.img"), "-append", "console=ttyS0 panic=-1",
                "-serial", f"file:{run}/serial.log", *ports,
                "-blockdev", f"driver=file,node-name=f,filename={run}/root.qcow2",
                "-blockdev", "driver=qcow2,node-name=root,file=f",
                "-device", "virtio-blk-pci,drive=root,bus=rp-disk",
                "-netdev", "user,id=nat", "-device", "virtio-net-pci,netdev=nat,bus=rp-nic",
                "-device", "virtio-scsi-pci,id=scsi0", "-object", "rng-random,id=rng0,filename=/dev/urandom",
                "-device", "virtio-rng-pci,rng=rng0",
                "-qmp", f"unix:{run}/qmp.sock,server=on,wait=off", "-pidfile", f"{run}/qemu.pid", "-daemonize"]

    async def _one(self, i: int) -> None:
        run = self.base / f"raw{i}"
        run.mkdir(parents=True, exist_ok=True)
        img = await asyncio.create_subprocess_exec("qemu-img", "create", "-q", "-f", "qcow2", str(run / "root.qcow2"),
                                                   "64M")
        await img.wait()
        qemu = await asyncio.create_subprocess_exec(*self._argv(i), stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL)
        if await qemu.wait() != 0:
            raise RuntimeError("raw QEMU did not start")
        while await qmp_status(run / "qmp.sock") != "running":
            await asyncio.sleep(0.02)
        self.pids.append(int((run / "qemu.pid").read_text()))

    def start(self) -> float:
        """Start all N at once; the wall time until every one runs."""
        began = time.monotonic()

        async def everyone() -> None:
            await asyncio.gather(*(self._one(i) for i in range(self.count)))
        asyncio.run(everyone())
        return time.monotonic() - began

    def wait_booted(self, timeout: float = 600.0) -> None:
        wait_for(lambda: all(booted(self.base / f"raw{i}" / "serial.log") for i in range(self.count)),
                 timeout=timeout, step=0.2)

    def power_off(self) -> float:
        """ACPI power button to all at once (repeated like ours does), until every QEMU has exited."""
        began = time.monotonic()

        async def one(i: int, pid: int) -> None:
            sock = self.base / f"raw{i}" / "qmp.sock"

            async def press() -> None:
                # Not qemu.qmp's session: its disconnect from a QEMU that is going down can hang for seconds,
                # which measured the client rather than the shutdown. The answer is awaited (QEMU drops the
                # commands of a client that hangs up before they ran), then the connection just closed.
                reader, writer = await qmpwire.connect(sock, 1.0, 1 << 20)
                try:
                    writer.write(b'{"execute": "system_powerdown"}\n')
                    await writer.drain()
                    while "return" not in await qmpwire.read_message(reader):
                        pass
                finally:
                    await qmpwire.close(writer)

            while pid_alive(pid):
                # Bounded as a whole: a session to a guest that is just going down can hang in its disconnect.
                with contextlib.suppress(monitor.MonitorError, OSError, TimeoutError, ValueError,
                                         asyncio.IncompleteReadError):
                    await asyncio.wait_for(press(), 3.0)
                for _ in range(100):
                    if not pid_alive(pid):
                        return
                    await asyncio.sleep(0.02)

        async def everyone() -> None:
            await asyncio.gather(*(one(i, pid) for i, pid in enumerate(self.pids)))
        asyncio.run(everyone())
        return time.monotonic() - began

    def kill(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()
