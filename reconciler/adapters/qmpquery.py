"""Read-only QMP queries in pipelined batches over one plain socket: what a snapshot asks every running QEMU.

Called by the snapshot builder (``observe.live.query_live``, through ``observe.snapshot``) for each running
VM, in every ``plan``, ``status`` and sync reconcile. Commands that change a VM go through
``adapters.monitor`` (qemu.qmp's client); this module sends nothing but the queries its caller names.

Why not qemu.qmp here: its client costs ~0.5 ms of CPU to open and close a session and ~0.2 ms per command
(a task, a queue and a future per message; reader, writer and bottom-half tasks per session): ~2.9 ms of
CPU for a snapshot's queries of one VM, against ~1.4 ms for the same exchange here, where the whole batch
is one write and the answers are read line by line (measured on a 2-core EPYC; docs/performance.md). A
plan over 25 running VMs paid that 25 times, and the sync daemon once per reconcile.

Every exchange is bounded (``qmpwire.connect``'s deadline for the greeting, one deadline for a batch), and
every failure is a ``MonitorError``: a refused or missing socket, a timeout, a QEMU that hangs up, an answer
that is not JSON. A command QEMU refuses is a ``QueryError`` in its place of the batch's answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from reconciler.adapters import qmpwire
from reconciler.errors import MonitorError

CONNECT_TIMEOUT = 3.0
BATCH_TIMEOUT = 10.0
LINE_LIMIT = 64 << 20  # one answer per line: query-pci of a large machine is a few hundred KB

Query = tuple[str, Mapping[str, Any] | None]


class QueryError(MonitorError):
    """QEMU answered one command of a batch with an error (the others' answers stand)."""


class QuerySession:
    """One negotiated QMP connection, for ``batch``; ``session()`` makes one."""

    __slots__ = ("_next_id", "_reader", "_writer", "socket")

    def __init__(self, socket: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.socket = socket
        self._reader = reader
        self._writer = writer
        self._next_id = 0

    async def batch(self, queries: Sequence[Query], timeout: float = BATCH_TIMEOUT) -> list[Any]:
        """Send every query at once (one write) and return their answers in order: each is the command's
        ``return`` value, or a ``QueryError`` when QEMU refused that command.

        :raise MonitorError: When the connection is lost or the answers do not all come within ``timeout``.
        """
        if not queries:
            return []
        first = self._next_id
        self._next_id += len(queries)
        lines = [json.dumps({"execute": name, **({"arguments": dict(arguments)} if arguments else {}),
                             "id": first + offset}) for offset, (name, arguments) in enumerate(queries)]
        try:
            self._writer.write(("\n".join(lines) + "\n").encode())
            await self._writer.drain()
            answers = await asyncio.wait_for(self._answers(first, len(queries)), timeout)
        except TimeoutError as exc:
            raise MonitorError(f"{self.socket}: {queries[0][0]} and {len(queries) - 1} more: no answer "
                               f"within {timeout:g}s") from exc
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            raise MonitorError(f"{self.socket}: monitor connection lost ({type(exc).__name__})") from exc
        return [_result(name, answers[first + offset]) for offset, (name, _) in enumerate(queries)]

    async def _answers(self, first: int, count: int) -> dict[int, dict[str, Any]]:
        found: dict[int, dict[str, Any]] = {}
        while len(found) < count:
            message = await qmpwire.read_message(self._reader)
            ident = message.get("id")
            if isinstance(ident, int) and first <= ident < first + count:
                found[ident] = message
            # anything else is an asynchronous event, interleaved with the answers: a query needs none
        return found


def _result(name: str, message: dict[str, Any]) -> Any:
    if "return" in message:
        return message["return"]
    error = message.get("error")
    if isinstance(error, dict):
        return QueryError(f"{name}: {error.get('class', 'GenericError')}: {error.get('desc', '')}")
    return QueryError(f"{name}: an answer with neither return nor error: {str(message)[:200]}")


@contextlib.asynccontextmanager
async def session(socket: Path, timeout: float = CONNECT_TIMEOUT) -> AsyncIterator[QuerySession]:
    """Connect to ``socket``: the greeting and ``qmp_capabilities`` within ``timeout``; closed on exit.

    :raise MonitorError: When the socket is missing, refuses, or the greeting does not come in time.
    """
    reader, writer = await qmpwire.connect(socket, timeout, LINE_LIMIT)
    try:
        yield QuerySession(socket, reader, writer)
    finally:
        await qmpwire.close(writer)
