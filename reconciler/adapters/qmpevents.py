"""A lean, read-only QMP event stream: what the sync daemon's long-lived listener holds for each QEMU.

Called by ``runtime.listeners`` (one stream per running QEMU, on its ``events.sock``). Commands stay on
qemu.qmp (``adapters.monitor``); a snapshot's queries use ``adapters.qmpquery``; both lean clients share
``adapters.qmpwire``.

Why not qemu.qmp's ``QMPClient`` here: a listener only reads the greeting, negotiates capabilities once and
then reads one JSON object per line until the QEMU exits, for days. A connected ``QMPClient`` keeps three
tasks (reader, writer, bottom half), two queues, an event listener with its own queue and a history list,
logger adapters and futures: 34 KB of resident memory per connected QEMU, against 10 KB for this stream
reader and writer (100 paused QEMUs, docs/performance.md, issue 13).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from reconciler.adapters import qmpwire

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
        return cls(*await qmpwire.connect(socket, timeout, LINE_LIMIT))

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Each event as QEMU sent it (``event``, ``data``, ``timestamp``), in order, until the end of the
        stream: the QEMU exited (everything it wrote before is read first), or ``close()`` was called. A
        broken line (not JSON, over ``LINE_LIMIT``) ends the stream too: the caller still sees the exit."""
        while True:
            try:
                message = await qmpwire.read_message(self._reader)
            except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            if "event" in message:
                yield message

    async def aclose(self) -> None:
        """Close the connection and wait until it is closed."""
        await qmpwire.close(self._writer)

    def close(self) -> None:
        """Close the connection (idempotent); a reader waiting in ``events()`` sees the end of the stream."""
        with contextlib.suppress(Exception):
            self._writer.close()
