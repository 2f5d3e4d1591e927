"""A lean, read-only QMP event stream: what the sync daemon's long-lived listener holds for each QEMU.

Called by ``runtime.listeners`` (one stream per running QEMU, on its ``events.sock``). Commands and
queries stay on qemu.qmp (``adapters.monitor``), whose short-lived sessions need its full client.

Why not qemu.qmp's ``QMPClient`` here: a listener only reads the greeting, negotiates capabilities once and
then reads one JSON object per line until the QEMU exits, for days. A connected ``QMPClient`` keeps three
tasks (reader, writer, bottom half), two queues, an event listener with its own queue and a history list,
logger adapters and futures: 34 KB of resident memory per connected QEMU, against 10 KB for this stream
reader and writer (100 paused QEMUs, docs/performance.md, issue 13).

The QMP wire format (QEMU's docs/interop/qmp-spec): the server sends a greeting ``{"QMP": {...}}``; the
client sends ``{"execute": "qmp_capabilities"}`` and gets ``{"return": {}}``; from then on the server sends
events ``{"event": NAME, "data": {...}, "timestamp": {...}}``, one JSON object per line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from reconciler.errors import MonitorError

LINE_LIMIT = 1 << 20  # one event per line; QEMU's are small, this only bounds a broken peer


class EventStream:
    """One connected, negotiated QMP monitor, read for its events only; ``connect()`` makes one."""

    __slots__ = ("_reader", "_writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, socket: Path | str, timeout: float) -> EventStream:
        """Connect to ``socket``, read the greeting and negotiate capabilities, all within ``timeout``.

        :raise MonitorError: When the socket is missing, refuses, is not a QMP monitor, or is too slow.
        """
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(socket), limit=LINE_LIMIT),
                                                    timeout)
        except (OSError, TimeoutError) as exc:
            raise MonitorError(f"{socket}: cannot connect ({exc!r})") from exc
        stream = cls(reader, writer)
        try:
            await asyncio.wait_for(stream._negotiate(), timeout)
        except BaseException as exc:
            await asyncio.shield(stream.aclose())
            if isinstance(exc, (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError)):
                raise MonitorError(f"{socket}: QMP greeting failed ({exc!r})") from exc
            raise
        return stream

    async def _message(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError(f"not a QMP message: {line[:80]!r}")
        return message

    async def _negotiate(self) -> None:
        if "QMP" not in await self._message():
            raise ValueError("no QMP greeting")
        self._writer.write(b'{"execute": "qmp_capabilities"}\n')
        await self._writer.drain()
        while True:  # nothing but the answer is expected; anything else before it is skipped
            answer = await self._message()
            if "error" in answer:
                raise ValueError(f"qmp_capabilities refused: {answer['error']}")
            if "return" in answer:
                return

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Each event as QEMU sent it (``event``, ``data``, ``timestamp``), in order, until the end of the
        stream: the QEMU exited (everything it wrote before is read first), or ``close()`` was called. A
        broken line (not JSON, over ``LINE_LIMIT``) ends the stream too: the caller still sees the exit."""
        while True:
            try:
                message = await self._message()
            except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            if "event" in message:
                yield message

    async def aclose(self) -> None:
        """Close the connection and wait until it is closed."""
        self.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    def close(self) -> None:
        """Close the connection (idempotent); a reader waiting in ``events()`` sees the end of the stream."""
        with contextlib.suppress(Exception):
            self._writer.close()
