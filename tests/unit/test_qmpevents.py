"""The lean QMP event stream (``adapters.qmpevents``) against a QMP server speaking the wire protocol on a
real unix socket, and a sync listener following a real process (``sleep``) through it: the events it
writes before exiting are all handled before the exit is judged (a SHUTDOWN then exit is not a crash)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters.qmpevents import EventStream
from reconciler.errors import MonitorError
from reconciler.runtime.listeners import QMPListeners
from reconciler.runtime.store import Store
from reconciler.state import files
from reconciler.state.layout import StateLayout

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": ["oob"]}}
Session = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _event(name: str, **data: Any) -> dict[str, Any]:
    return {"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 2}}


async def _negotiated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[Any]:
    """Play QEMU's side of the greeting; what the client sent."""
    writer.write(_line(GREETING))
    await writer.drain()
    sent = [json.loads(await reader.readline())]
    writer.write(_line({"return": {}}))
    await writer.drain()
    return sent


async def _serve(path: Path, session: Session) -> asyncio.base_events.Server:
    return await asyncio.start_unix_server(session, path=str(path))


def test_events_in_order_until_the_end_of_the_stream(tmp_path: Path) -> None:
    sent: list[Any] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent.extend(await _negotiated(reader, writer))
        writer.write(_line(_event("STOP")) + _line({"return": {}}) + _line(_event("SHUTDOWN", guest=True,
                                                                                    reason="guest-shutdown")))
        await writer.drain()
        writer.close()  # QEMU exiting: everything written before the end is still read

    async def body() -> list[dict[str, Any]]:
        async with await _serve(tmp_path / "events.sock", session):
            stream = await EventStream.connect(tmp_path / "events.sock", 5)
            try:
                return [event async for event in stream.events()]
            finally:
                stream.close()

    events = asyncio.run(body())
    assert sent == [{"execute": "qmp_capabilities"}]
    assert [(event["event"], event["data"]) for event in events] == [
        ("STOP", {}), ("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})]


def test_close_ends_a_waiting_reader(tmp_path: Path) -> None:
    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _negotiated(reader, writer)
        await reader.read()  # quiet until the client hangs up
        writer.close()

    async def body() -> list[dict[str, Any]]:
        async with await _serve(tmp_path / "events.sock", session):
            stream = await EventStream.connect(tmp_path / "events.sock", 5)
            asyncio.get_running_loop().call_later(0.05, stream.close)
            return await asyncio.wait_for(_collect(stream), 5)

    assert asyncio.run(body()) == []


async def _collect(stream: EventStream) -> list[dict[str, Any]]:
    return [event async for event in stream.events()]


@pytest.mark.parametrize("greeting", [b'{"not": "qmp"}\n', b"garbage\n", b""])
def test_a_socket_that_is_not_a_qmp_monitor_is_refused(tmp_path: Path, greeting: bytes) -> None:
    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        writer.close()

    async def body() -> None:
        async with await _serve(tmp_path / "events.sock", session):
            await EventStream.connect(tmp_path / "events.sock", 5)

    with pytest.raises(MonitorError, match="greeting"):
        asyncio.run(body())


def test_a_refused_capabilities_negotiation_and_a_missing_socket_are_refused(tmp_path: Path) -> None:
    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_line(GREETING))
        await reader.readline()
        writer.write(_line({"error": {"class": "CommandNotFound", "desc": "no"}}))
        await writer.drain()
        writer.close()

    async def body() -> None:
        async with await _serve(tmp_path / "events.sock", session):
            await EventStream.connect(tmp_path / "events.sock", 5)

    with pytest.raises(MonitorError, match="refused"):
        asyncio.run(body())
    with pytest.raises(MonitorError, match="cannot connect"):
        asyncio.run(EventStream.connect(tmp_path / "missing.sock", 5))


def test_a_listener_handles_the_last_events_before_judging_the_exit(tmp_path: Path) -> None:
    """A SHUTDOWN written just before the process dies is handled first: the exit is recorded as that
    shutdown, not as a crash; a STOP before it was reported too."""
    layout, store = StateLayout(tmp_path), Store(tmp_path / "infinization.db")
    paths = layout.vm("a")
    paths.events.parent.mkdir(parents=True)
    triggered: list[str] = []
    process = subprocess.Popen(["sleep", "30"])
    connected = asyncio.Event()

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _negotiated(reader, writer)
        connected.set()
        await asyncio.sleep(0.05)
        writer.write(_line(_event("STOP")) + _line(_event("SHUTDOWN", guest=True, reason="guest-shutdown")))
        await writer.drain()
        process.kill()  # the process dies; its monitor ends a moment later
        await asyncio.sleep(0.3)
        writer.close()

    async def body() -> None:
        listeners = QMPListeners(layout, store, triggered.append)
        async with await _serve(paths.events, session):
            listeners.ensure("a", process.pid)
            task = listeners._listeners["a"].task
            assert task is not None
            await asyncio.wait_for(connected.wait(), 10)
            await asyncio.wait_for(task, 10)
        await listeners.close()

    try:
        asyncio.run(body())
        record = files.read_exit(paths)
        assert record is not None and record.reason == "guest-shutdown"
        assert triggered == ["a", "a", "a"]  # STOP, SHUTDOWN, the exit
    finally:
        process.kill()
        process.wait()
        store.close()


def test_the_listeners_hold_no_qemu_qmp_client() -> None:
    """The daemon's per-VM listener stays lean (issue 13: memory per VM): its module imports no qemu.qmp
    (short-lived sessions import it where they are used, ``adapters.monitor``) and no pyroute2."""
    probe = "import json, sys; import reconciler.runtime.listeners; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stdout)
    assert [name for name in modules if name.startswith(("qemu", "pyroute2"))] == []
