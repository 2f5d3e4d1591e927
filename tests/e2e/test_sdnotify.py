"""``infinization sync`` under systemd's notification protocol, without systemd: a real unix datagram socket
plays the service manager's ``$NOTIFY_SOCKET`` around a real daemon process that boots a real VM.

What systemd would see: READY=1 only once the first pass has started the VM, STATUS= lines, WATCHDOG=1 at
half the watchdog period from the event loop (and none while the loop is blocked: here by a writer holding
the status store's lock, a real hang the watchdog is for), STOPPING=1 on SIGTERM with the VM left running.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

from tests.e2e.harness import ROOT, Host, vm_manifest

WATCHDOG_SECONDS = 2.0  # WatchdogSec=2: pings due every second, systemd would kill after 2 s without one


class FakeManager:
    """The service manager's end of $NOTIFY_SOCKET: every datagram, parsed, with its arrival time."""

    def __init__(self, address: str) -> None:
        self.address = address  # as in $NOTIFY_SOCKET: '@' for the abstract namespace
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self.sock.close()

    def received(self) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return list(self.messages)

    def times(self, key: str, since: float = 0.0, until: float = float("inf")) -> list[float]:
        return [t for t, fields in self.received() if key in fields and since <= t <= until]

    def wait(self, predicate: Callable[[dict[str, str]], bool], what: str, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, fields in self.received():
                if predicate(fields):
                    return t
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; got {[f for _, f in self.received()]}")


def _start(host: Host, manager: FakeManager, **env: str) -> subprocess.Popen[bytes]:
    with open(host.base / "sync.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "reconciler", "sync", str(host.manifests), "--metrics-address", "none"],
            env=host.env(NOTIFY_SOCKET=manager.address, **env), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def _qemu_pid(host: Host, vm: str) -> int | None:
    try:
        pid = int(host.pidfile(vm).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid in host.qemu_pids(vm) else None


def test_ready_after_first_pass_watchdog_from_the_loop_and_stopping(host: Host) -> None:
    host.write("a.yaml", vm_manifest("a"))
    manager = FakeManager(f"@infz-notify-{uuid.uuid4().hex[:8]}")  # abstract, as systemd's own
    daemon = _start(host, manager, WATCHDOG_USEC=str(int(WATCHDOG_SECONDS * 1_000_000)))
    try:
        ready = manager.wait(lambda f: f.get("READY") == "1", "READY=1")
        # Ready means the first pass is over: the VM's QEMU runs (its start waits for the guest to run).
        pid = _qemu_pid(host, "a")
        assert pid is not None, "READY=1 before the VM was started"
        first = [f["STATUS"] for t, f in manager.received() if t <= ready and "STATUS" in f]
        assert first[0].startswith("first reconcile: 0 of 2"), first  # the host's networking and VM a
        ready_status = next(f for t, f in manager.received() if f.get("READY") == "1")["STATUS"]
        assert "1 VM (1 Running)" in ready_status and "0 not Ready" in ready_status, ready_status
        assert manager.times("WATCHDOG", until=ready), "no watchdog ping while starting (systemd's runs already)"
        assert not any("MAINPID" in f for _, f in manager.received())

        # Idle: a ping every half period, never a gap systemd would kill for.
        calm = time.monotonic()
        time.sleep(3 * WATCHDOG_SECONDS)
        pings = manager.times("WATCHDOG", since=calm)
        assert len(pings) >= 4, pings
        assert max(_gaps(pings)) < WATCHDOG_SECONDS, _gaps(pings)

        # A hung event loop: a writer holds the status store's lock, and the daemon's next write (the
        # broken manifest's event) blocks the loop in SQLite's busy wait. No ping may come meanwhile.
        blocker = sqlite3.connect(host.state / "infinization.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            blocked = time.monotonic()
            host.write("broken.yaml", "kind: [")
            time.sleep(3 * WATCHDOG_SECONDS)
            released = time.monotonic()
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        during = manager.times("WATCHDOG", since=blocked - WATCHDOG_SECONDS, until=released)
        longest = max(_gaps([blocked - WATCHDOG_SECONDS, *during, released]))
        assert longest > 2 * WATCHDOG_SECONDS, f"pings went on while the loop was blocked: {during}"
        # ...and they resume once it runs again, the error recorded.
        host.wait_for(lambda: manager.times("WATCHDOG", since=released), "pings to resume", timeout=10)
        assert manager.times("WATCHDOG", since=released)[0] - released < WATCHDOG_SECONDS
        host.wait_for(lambda: any(e["kind"] == "manifest" and "broken.yaml" in str(e["message"])
                                  for e in host.events()), "the broken manifest's event")

        # SIGTERM: STOPPING=1, a clean exit, the VM left running.
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        stopping = [f for _, f in manager.received() if f.get("STOPPING") == "1"]
        assert stopping and "VMs keep running" in stopping[0]["STATUS"], stopping
        assert _qemu_pid(host, "a") == pid
    finally:
        if daemon.poll() is None:
            daemon.kill()
        manager.close()


def test_watchdog_of_another_pid_is_not_ours_and_the_path_socket_works(host: Host) -> None:
    path = host.base / "notify.sock"
    manager = FakeManager(str(path))
    daemon = _start(host, manager, WATCHDOG_USEC="1000000", WATCHDOG_PID=str(os.getpid()))
    try:
        ready = manager.wait(lambda f: f.get("READY") == "1", "READY=1", timeout=60)
        status = next(f for _, f in manager.received() if f.get("READY") == "1")["STATUS"]
        assert status.startswith("0 VMs"), status  # nothing to manage: ready after the host's pass
        time.sleep(1.5)  # three periods of a watchdog that would be ours
        assert manager.times("WATCHDOG") == [], "pinged for a watchdog meant for another process"
        assert ready
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        assert any(f.get("STOPPING") == "1" for _, f in manager.received())
    finally:
        if daemon.poll() is None:
            daemon.kill()
        manager.close()
