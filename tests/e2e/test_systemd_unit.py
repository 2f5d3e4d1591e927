"""The shipped unit (examples/08-systemd-unit) under a real systemd, managing the bundled demo.

This machine need not run systemd as PID 1: the test boots one in a throwaway container
(``systemd-nspawn --volatile=yes``: the host's /usr and /etc read-only, everything else fresh, its own
network namespace, a pure cgroup v2 hierarchy), installs the unit and the demo manifests as
scripts/setup.sh does, and runs the worktree's code (a drop-in sets PYTHONPATH, as the harness runs
``python -m reconciler`` from it). With every hardening option of the unit in force, it checks what
systemd and the guest see:

- ``systemctl start`` returns once the daemon is ready, and then the demo VM runs (READY=1 after the first
  pass); its guest boots and reports; the status line counts it.
- QEMU left the service's cgroup, runs filtered (NoNewPrivs, seccomp) as its user.
- Restart and stop of the service leave the VM running (same QEMU); a blocked event loop stops the watchdog
  pings, systemd kills the daemon (result ``watchdog``) and restarts it, and the VM keeps running.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import GUEST_DIR, ROOT

UNIT = ROOT / "examples/08-systemd-unit/infinization-sync.service"
STATE = "/var/lib/infinization"


class Container:
    """A booted systemd in its own namespaces; commands run in it through nsenter."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.name = f"infz-{uuid.uuid4().hex[:8]}"
        (base / "opt").mkdir()
        binds = ["--bind-ro=/etc", f"--bind-ro={ROOT}", f"--bind-ro={GUEST_DIR}:/var/cache/infinization/guest",
                 f"--overlay=/opt:{base / 'opt'}:/opt"]
        for prefix in {sys.base_prefix, sys.prefix}:  # the interpreter and the venv, where /usr and /opt miss them
            if not prefix.startswith(("/usr/", "/opt/")):
                binds.append(f"--bind-ro={prefix}")
        with open(base / "nspawn.log", "wb") as log:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--register=no", "--keep-unit", "-M", self.name, "-D", "/", "--volatile=yes",
                 "--private-network", *binds, "-b", "--", "systemd.firstboot=off"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                # A pure cgroup v2 hierarchy inside, as on a Debian 12 host, even where this host is hybrid.
                env=dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1"))
        self.init = self._wait_init()

    def _wait_init(self) -> int:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.nspawn.poll() is None, (self.base / "nspawn.log").read_text(errors="replace")
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
            for pid in children.read_text().split() if children.exists() else []:
                state = self.run("systemctl", "is-system-running", check=False, init=int(pid)).stdout.strip()
                if state in ("running", "degraded"):  # degraded: a host unit that cannot work in here
                    return int(pid)
            time.sleep(0.5)
        raise AssertionError(f"the container did not boot: {(self.base / 'nspawn.log').read_text(errors='replace')}")

    def run(self, *argv: str, check: bool = True, init: int | None = None, timeout: float = 300,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["nsenter", "-t", str(init or self.init), "-a", "--", *argv], capture_output=True,
                              text=True, check=False, timeout=timeout, input=stdin)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def path(self, inside: str) -> Path:
        """A path of the container's file system, seen from here."""
        return Path(f"/proc/{self.init}/root{inside}")

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "-p", ",".join(props), "infinization-sync").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def qemu_pid(self) -> int:
        """The demo's QEMU, as a PID of the container (its pidfile), checked alive there."""
        pid = int(self.path(f"{STATE}/vms/demo/run/qemu.pid").read_text())
        self.run("kill", "-0", str(pid))
        return pid

    def wait_for(self, predicate: Callable[[], object], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n{self.journal()}"
            time.sleep(0.2)

    def journal(self) -> str:
        return self.run("journalctl", "-u", "infinization-sync", "--no-pager", "-o", "cat", check=False).stdout[-6000:]

    def close(self) -> None:
        self.nspawn.send_signal(signal.SIGTERM)  # a clean shutdown of the container, its VMs with it
        try:
            self.nspawn.wait(timeout=60)
        except subprocess.TimeoutExpired:
            for pid in (self.init, self.nspawn.pid):  # the PID namespace dies with its init
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.nspawn.wait(timeout=30)


@pytest.fixture
def container(guest_image: Path) -> Iterator[Container]:
    if shutil.which("systemd-nspawn") is None:
        pytest.fail("systemd-nspawn is not installed (Debian package systemd-container; scripts/setup.sh)")
    base = Path(tempfile.mkdtemp(prefix="infz-sd-", dir="/tmp"))
    box = Container(base)
    try:
        yield box
    finally:
        box.close()
        shutil.rmtree(base, ignore_errors=True)


def _install(box: Container) -> None:
    """What scripts/setup.sh does for the service, plus the drop-in that runs this worktree's code."""
    setup = (ROOT / "scripts/setup.sh").read_text()
    manifests = re.search(r"^MANIFESTS=(\S+)$", setup, re.M)
    assert manifests, "setup.sh no longer says where the demo manifests go"
    box.run("install", "-d", "-m", "0755", STATE, manifests.group(1))
    box.run("install", "-m", "0644", str(ROOT / "manifests/demo.yaml"), f"{manifests.group(1)}/demo.yaml")
    box.run("install", "-m", "0644", str(UNIT), "/run/systemd/system/")  # /etc is the host's, read-only
    box.run("install", "-d", "/run/systemd/system/infinization-sync.service.d")
    # The checkout may sit under /tmp (CI clones there), which PrivateTmp= hides: bind it back, read-only.
    box.run("tee", "/run/systemd/system/infinization-sync.service.d/worktree.conf",
            stdin=f"[Service]\nEnvironment=PYTHONPATH={ROOT}\nBindReadOnlyPaths={ROOT}\n")
    box.run("systemctl", "daemon-reload")


def test_the_unit_runs_the_demo_hardened_and_keeps_it_across_restarts_and_watchdog(container: Container) -> None:
    box = container
    assert box.run("stat", "-fc", "%T", "/sys/fs/cgroup").stdout.strip() == "cgroup2fs"
    _install(box)
    box.run("systemctl", "start", "infinization-sync")  # Type=notify: returns on READY=1
    # Ready means the first pass is over: the demo's QEMU already runs.
    pid = box.qemu_pid()
    shown = box.show("ActiveState", "StatusText", "NRestarts", "MainPID")
    assert shown["ActiveState"] == "active" and "1 VM (1 Running)" in shown["StatusText"], shown
    serial = box.path(f"{STATE}/vms/demo/run/serial.log")
    box.wait_for(lambda: "INFZ-REPORT" in serial.read_text(errors="replace"), "the demo guest to report")

    # QEMU outside the service's cgroup (its limits and device policy are not the VM's), still confined.
    status = box.path(f"/proc/{pid}/status").read_text()
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M) and re.search(r"^Seccomp:\s+2$", status, re.M)
    assert re.search(r"^CapBnd:\s+0+$", status, re.M)
    v2 = [line for line in box.path(f"/proc/{pid}/cgroup").read_text().splitlines() if line.startswith("0::")]
    assert v2 and "infinization-sync.service" not in v2[0], v2
    # UMask=0077 and the daemon's own modes: nothing in the state directory is readable by others.
    found = box.run("find", STATE, "-perm", "/004", "-not", "-type", "l").stdout.split()
    assert found == [], found

    # A restart and a stop of the service leave the VM alone.
    box.run("systemctl", "restart", "infinization-sync")
    assert box.qemu_pid() == pid
    assert box.show("MainPID")["MainPID"] != shown["MainPID"]

    # A hung event loop: a writer holds the status store's lock while a broken manifest makes the daemon
    # write an event. The watchdog (5 s here) fires, systemd kills and restarts the daemon; the VM stays.
    box.run("tee", "/run/systemd/system/infinization-sync.service.d/watchdog.conf", stdin="[Service]\nWatchdogSec=5s\n")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "restart", "infinization-sync")
    before = int(box.show("NRestarts")["NRestarts"])
    box.run(sys.executable, "-c", (
        "import sqlite3, time, pathlib\n"
        f"db = sqlite3.connect('{STATE}/infinization.db', isolation_level=None)\n"
        "db.execute('BEGIN IMMEDIATE')\n"
        "pathlib.Path('/opt/infinization/manifests/broken.yaml').write_text('kind: [')\n"
        "time.sleep(9)\n"
        "db.execute('ROLLBACK')\n"))
    box.wait_for(lambda: int(box.show("NRestarts")["NRestarts"]) > before, "systemd to restart the hung daemon")
    assert "Watchdog timeout" in box.run("journalctl", "-u", "infinization-sync", "--no-pager").stdout
    box.run("rm", "/opt/infinization/manifests/broken.yaml")
    box.wait_for(lambda: box.show("ActiveState")["ActiveState"] == "active", "the restarted daemon to be ready")
    assert box.qemu_pid() == pid

    box.run("systemctl", "stop", "infinization-sync")
    assert box.show("ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
    assert box.qemu_pid() == pid
