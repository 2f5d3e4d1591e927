"""A throwaway PostgreSQL server for the end-to-end tests (the ``postgres_server`` and ``postgres`` fixtures of
conftest.py), which a test may stop and start to play an outage of the status mirror's database."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


class PostgresServer:
    """A throwaway PostgreSQL server of Debian's packages, listening only on a UNIX socket in a directory of
    its own (reachable from a test's network namespace too), on a port no other server of this machine
    uses. A test may stop it (``pg_ctl stop -m fast`` or ``immediate``: a crash) and start it again."""

    def __init__(self) -> None:
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        assert bindir, "PostgreSQL is not installed: run scripts/setup.sh"
        self.bin = bindir[-1]
        self.base = Path(tempfile.mkdtemp(prefix="infz-pg-", dir="/tmp"))
        shutil.chown(self.base, "postgres", "postgres")
        self.port = _free_port()
        self.url = f"postgresql://postgres@/postgres?host={self.base}&port={self.port}"
        self._pg(["initdb", "-D", str(self.base / "data"), "-A", "trust", "-U", "postgres"])

    def _pg(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / argv[0]), *argv[1:]],
                              capture_output=True, timeout=120)
        assert done.returncode == 0 or not check, f"{argv[0]} failed: {done.stderr.decode(errors='replace')}"
        return done

    def start(self) -> None:
        """Start it and wait until it accepts connections (pg_ctl -w)."""
        self._pg(["pg_ctl", "-D", str(self.base / "data"), "-w", "-t", "60", "-l", str(self.base / "log"), "-o",
                  f"-k {self.base} -c listen_addresses='' -p {self.port}", "start"])

    def stop(self, mode: str = "fast") -> None:
        """Stop it and wait until it is gone: ``fast`` disconnects clients cleanly, ``immediate`` is a crash
        (recovery at the next start)."""
        self._pg(["pg_ctl", "-D", str(self.base / "data"), "-w", "-t", "60", "-m", mode, "stop"])

    def running(self) -> bool:
        return self._pg(["pg_ctl", "-D", str(self.base / "data"), "status"], check=False).returncode == 0

    def destroy(self) -> None:
        if self.running():
            self._pg(["pg_ctl", "-D", str(self.base / "data"), "-m", "immediate", "stop"], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def _free_port() -> int:
    """A TCP port nothing listens on now: the server uses it only to name its socket and lock files, and
    a port in use elsewhere would still confuse a reader of `ss`."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
