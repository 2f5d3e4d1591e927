"""The QMP wire protocol over a plain unix socket: connect, read the greeting, negotiate, read a message.

Shared by the two lean QMP clients: ``adapters.qmpevents`` (the sync daemon's long-lived event streams) and
``adapters.qmpquery`` (a snapshot's pipelined read-only queries). Commands that change a VM stay on qemu.qmp
(``adapters.monitor``). Each module says why it does not use qemu.qmp's client.

The wire format (QEMU's docs/interop/qmp-spec): the server sends a greeting ``{"QMP": {...}}``; the client
sends ``{"execute": "qmp_capabilities"}`` and gets ``{"return": {}}``; from then on each command's answer
(``{"return": ...}`` or ``{"error": {"class", "desc"}}``, with the command's ``id``) and each event
(``{"event": NAME, "data": {...}, "timestamp": {...}}``) is one JSON object on one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from reconciler.errors import MonitorError


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next message. :raise asyncio.IncompleteReadError: At the end of the stream. :raise ValueError: When
    a line is not a JSON object, or is longer than the reader's limit."""
    line = await reader.readline()
    if not line:
        raise asyncio.IncompleteReadError(b"", None)
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError(f"not a QMP message: {line[:80]!r}")
    return message


async def _negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if "QMP" not in await read_message(reader):
        raise ValueError("no QMP greeting")
    writer.write(b'{"execute": "qmp_capabilities"}\n')
    await writer.drain()
    while True:  # nothing but the answer is expected; an event sent before it is skipped
        answer = await read_message(reader)
        if "error" in answer:
            raise ValueError(f"qmp_capabilities refused: {answer['error']}")
        if "return" in answer:
            return


async def connect(socket: Path | str, timeout: float,
                  limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``socket``, read the greeting and negotiate capabilities, all within ``timeout`` (a second
    client on a busy monitor waits forever for its greeting: host-facts.md). ``limit``: the longest line.

    :raise MonitorError: When the socket is missing, refuses, is not a QMP monitor, or is too slow.
    """
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(socket), limit=limit), timeout)
    except (OSError, TimeoutError) as exc:
        raise MonitorError(f"cannot connect to QMP monitor {socket}: {exc!r}") from exc
    try:
        await asyncio.wait_for(_negotiate(reader, writer), timeout)
    except BaseException as exc:
        await asyncio.shield(close(writer))
        if isinstance(exc, TimeoutError):
            raise MonitorError(f"QMP monitor {socket}: no greeting within {timeout:g}s (is another client "
                               "holding it?)") from exc
        if isinstance(exc, (OSError, ValueError, asyncio.IncompleteReadError)):
            raise MonitorError(f"QMP monitor {socket}: greeting failed ({exc!r})") from exc
        raise
    return reader, writer


async def close(writer: asyncio.StreamWriter) -> None:
    """Close the connection and wait until it is closed (never raises)."""
    with contextlib.suppress(Exception):
        writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
