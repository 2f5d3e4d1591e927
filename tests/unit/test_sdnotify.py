"""sd_notify: the protocol (``runtime.sdnotify``) over a real unix datagram socket, and what the daemon tells
systemd when (``runtime.service``). The timing (watchdog pings from the event loop, none while it is
blocked) is proven on a real daemon process in ``tests/e2e/test_sdnotify.py``."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.runtime.sdnotify import Notifier, socket_address, watchdog_seconds
from reconciler.runtime.service import EXTEND_START_SECONDS, ServiceNotifier


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


def _drain(sock: socket.socket) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return messages
        messages.append(dict(line.split("=", 1) for line in data.decode().split("\n")))


def test_socket_address_abstract_and_path() -> None:
    assert socket_address("@/org/freedesktop/systemd1/notify/42") == b"\0/org/freedesktop/systemd1/notify/42"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    ("30000000", None, 30.0),
    ("30000000", "1234", 30.0),  # WATCHDOG_PID names us
    ("30000000", "999", None),  # another process of the service must ping
    ("30000000", "x", None),
    ("0", None, None),
    ("", None, None),
    (None, "1234", None),
    ("-5", None, None),
])
def test_watchdog_is_ours_only_when_asked_and_for_our_pid(usec: str | None, pid: str | None,
                                                          expected: float | None) -> None:
    assert watchdog_seconds(usec, pid, 1234) == expected


def test_from_environment_takes_the_variables_away_from_children(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@abc")
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier.from_environment()
    assert notifier.address == b"\0abc" and notifier.watchdog == 4.0

    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)


def test_without_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environment()
    assert not notifier.enabled and notifier.send(ready="1") is False


def test_send_one_datagram_of_lines(manager: socket.socket) -> None:
    notifier = Notifier(manager.getsockname())
    assert notifier.send(ready="1", status="two\nlines")
    assert _drain(manager) == [{"READY": "1", "STATUS": "two lines"}]


def test_a_vanished_socket_is_not_fatal(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    assert notifier.send(watchdog="1") is False
    assert notifier.send(watchdog="1") is False


def test_ready_only_once_every_key_of_the_first_pass_was_reconciled(manager: socket.socket) -> None:
    queued: list[str] = ["a", "b"]
    service = ServiceNotifier(Notifier(manager.getsockname()), queued=lambda: len(queued))
    service.first_pass(["@host", "a", "b"])
    assert _drain(manager) == [{"STATUS": "first reconcile: 0 of 3 done"}]
    service.reconciled("@host")
    service.reconciled("@host")  # again (a retry): still one key
    service.reconciled("c")  # not of the first pass (a VM that appeared meanwhile)
    messages = _drain(manager)
    assert not any("READY" in m for m in messages)
    assert {"EXTEND_TIMEOUT_USEC": str(EXTEND_START_SECONDS * 1_000_000)} in messages
    assert {"STATUS": "first reconcile: 1 of 3 done"} in messages
    service.reconciled("a")
    queued.clear()
    service.reconciled("b")
    ready = [m for m in _drain(manager) if "READY" in m]
    assert ready and ready[0]["READY"] == "1" and ready[0]["STATUS"].endswith("not Ready, 0 queued"), ready
    assert service.ready


def test_nothing_to_do_is_ready_at_once_and_stopping_says_the_vms_stay(manager: socket.socket) -> None:
    service = ServiceNotifier(Notifier(manager.getsockname()), queued=lambda: 0)
    service.first_pass([])
    assert any(m.get("READY") == "1" for m in _drain(manager))
    service.stopping()
    assert _drain(manager) == [{"STOPPING": "1", "STATUS": "stopping; VMs keep running"}]
