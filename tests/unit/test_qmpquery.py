"""The lean QMP query batches (``adapters.qmpquery``) against a server speaking QMP's wire protocol on a real
unix socket: answers matched to their queries by id with events interleaved, a refused command in its place,
and every way a monitor can fail (gone, silent, hanging up mid-batch) a ``MonitorError`` within its deadline.
Against real QEMUs, every e2e test's plan goes through it (``observe.live.query_live``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters import qmpquery
from reconciler.errors import MonitorError

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": ["oob"]}}
Session = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


async def _negotiated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(_line(GREETING))
    assert json.loads(await reader.readline())["execute"] == "qmp_capabilities"
    writer.write(_line({"event": "RESUME", "data": {}}) + _line({"return": {}}))
    await writer.drain()


def _run(tmp_path: Path, session: Session, body: Callable[[Path], Awaitable[Any]]) -> Any:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await session(reader, writer)
        finally:
            writer.close()

    async def main() -> Any:
        path = tmp_path / "qmp.sock"
        async with await asyncio.start_unix_server(closing, path=str(path)):
            return await body(path)
    return asyncio.run(main())


def test_answers_come_back_in_query_order_with_events_between_and_a_refusal_in_place(tmp_path: Path) -> None:
    asked: list[dict[str, Any]] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _negotiated(reader, writer)
        batch = [json.loads(await reader.readline()) for _ in range(3)]
        asked.extend(batch)
        # QEMU answers in order; an event may come between any two answers.
        for request in batch:
            if request["execute"] == "query-spice":
                writer.write(_line({"error": {"class": "CommandNotFound", "desc": "no spice"},
                                    "id": request["id"]}))
            else:
                writer.write(_line({"return": {"asked": request["execute"]}, "id": request["id"]}))
            writer.write(_line({"event": "NIC_RX_FILTER_CHANGED", "data": {}}))
        second = json.loads(await reader.readline())
        asked.append(second)
        writer.write(_line({"return": "52:54:00:00:00:01", "id": second["id"]}))
        await reader.read()

    async def body(path: Path) -> tuple[list[Any], list[Any]]:
        async with qmpquery.session(path) as qmp:
            first = await qmp.batch([("query-status", None), ("query-spice", None),
                                     ("qom-list", {"path": "/machine/peripheral"})])
            second = await qmp.batch([("qom-get", {"path": "/machine/peripheral/nic-a", "property": "mac"})])
            return first, second

    first, second = _run(tmp_path, session, body)
    assert first[0] == {"asked": "query-status"} and first[2] == {"asked": "qom-list"}
    assert isinstance(first[1], qmpquery.QueryError) and "CommandNotFound: no spice" in str(first[1])
    assert second == ["52:54:00:00:00:01"]
    assert [a["execute"] for a in asked] == ["query-status", "query-spice", "qom-list", "qom-get"]
    assert asked[2]["arguments"] == {"path": "/machine/peripheral"} and "arguments" not in asked[0]
    assert len({a["id"] for a in asked}) == 4, "every query of a session has its own id"


def test_a_monitor_that_hangs_up_mid_batch_is_a_monitor_error(tmp_path: Path) -> None:
    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _negotiated(reader, writer)
        request = json.loads(await reader.readline())
        writer.write(_line({"return": {}, "id": request["id"]}))
        writer.close()  # the QEMU exited after one answer of two

    async def body(path: Path) -> None:
        async with qmpquery.session(path) as qmp:
            await qmp.batch([("query-status", None), ("query-pci", None)])

    with pytest.raises(MonitorError, match="connection lost"):
        _run(tmp_path, session, body)


@pytest.mark.parametrize("silent_at", ["greeting", "batch"])
def test_a_silent_monitor_is_a_monitor_error_within_the_deadline(tmp_path: Path, silent_at: str) -> None:
    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if silent_at == "batch":
            await _negotiated(reader, writer)
        await reader.read()  # says nothing (another client holds QEMU's monitor; or QEMU is stuck)

    async def body(path: Path) -> None:
        async with qmpquery.session(path, timeout=0.3) as qmp:
            await qmp.batch([("query-status", None)], timeout=0.3)

    began = time.monotonic()
    with pytest.raises(MonitorError, match=r"no greeting within|no answer within"):
        _run(tmp_path, session, body)
    assert time.monotonic() - began < 5


def test_a_missing_socket_or_a_stranger_is_a_monitor_error(tmp_path: Path) -> None:
    async def missing() -> None:
        async with qmpquery.session(tmp_path / "absent.sock"):
            pass

    with pytest.raises(MonitorError, match="cannot connect"):
        asyncio.run(missing())

    async def stranger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\n")  # not JSON
        await writer.drain()
        await reader.read()
        writer.close()

    async def body(path: Path) -> None:
        async with qmpquery.session(path):
            pass

    with pytest.raises(MonitorError, match="greeting failed"):
        _run(tmp_path, stranger, body)
