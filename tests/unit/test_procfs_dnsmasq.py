"""A Network's dnsmasq is trusted by PID only when /proc proves it (``adapters.procfs.find_dnsmasq``): a real
dnsmasq naming its pidfile is found; a recycled PID whose process only forges that argv is not."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.adapters import procfs

pytestmark = pytest.mark.skipif(shutil.which("dnsmasq", path="/usr/sbin:/usr/bin") is None,
                                reason="dnsmasq is not installed")


def _until(check: object, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        process.kill()
        process.wait()


def test_a_real_dnsmasq_naming_its_pidfile_is_found(tmp_path: Path,
                                                     started: list[subprocess.Popen[bytes]]) -> None:
    pidfile = tmp_path / "lan.dnsmasq.pid"
    started.append(subprocess.Popen(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
                                     f"--pid-file={pidfile}"]))
    _until(lambda: pidfile.exists() and pidfile.read_text().strip().isdigit())
    assert procfs.find_dnsmasq(pidfile) == int(pidfile.read_text())


def test_a_process_that_forges_the_argv_is_not_trusted(tmp_path: Path,
                                                       started: list[subprocess.Popen[bytes]]) -> None:
    pidfile = tmp_path / "lan.dnsmasq.pid"
    forged = subprocess.Popen(["dnsmasq", "-c", "import time; time.sleep(60)", f"--pid-file={pidfile}"],
                              executable=sys.executable)
    started.append(forged)
    pidfile.write_text(f"{forged.pid}\n")
    _until(lambda: procfs.read_cmdline(forged.pid) is not None and "-c" in (procfs.read_cmdline(forged.pid) or ()))
    assert f"--pid-file={pidfile}" in (procfs.read_cmdline(forged.pid) or ())
    assert procfs.find_dnsmasq(pidfile) is None
