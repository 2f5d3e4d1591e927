"""A short-lived QMP session with deadlines, over qemu.qmp's asyncio client.

qemu.qmp's ``connect()`` has no timeout and a second client on a busy monitor waits forever for its
greeting, so every call here is bounded. Observers use it for queries (``query-status``); the executor
uses it for commands (``block_resize``, ``system_powerdown``, ``quit``). Each VM has two monitors: this
module talks to ``qmp.sock``; ``events.sock`` is left for a long-lived event listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError, StateError

from reconciler.errors import MonitorError

CONNECT_TIMEOUT = 3.0
COMMAND_TIMEOUT = 10.0

# qemu.qmp logs every disconnect at ERROR level; our callers report failures themselves.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class _QuietClient(QMPClient):
    """qemu.qmp's client without its message log: its hooks pretty-print every message as indented JSON
    for a debug line (``str(msg)`` runs even when the logger is off). For a snapshot's answers
    (``query-pci``, ``query-named-block-nodes``) that was most of the CPU an observation spent."""

    def _cb_outbound(self, msg):  # type: ignore[no-untyped-def]
        return msg

    def _cb_inbound(self, msg):  # type: ignore[no-untyped-def]
        return msg


class Monitor:
    """One connected QMP client; use ``session()`` to get one."""

    def __init__(self, client: QMPClient, socket: Path) -> None:
        self._client = client
        self.socket = socket

    @property
    def client(self) -> QMPClient:
        """The underlying qemu.qmp client, for event listeners."""
        return self._client

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                      timeout: float = COMMAND_TIMEOUT) -> Any:
        """Run one command and return its ``return`` value.

        :raise MonitorError: When QEMU answers with an error, goes away, or does not answer in time.
        """
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise MonitorError(f"{command}: {exc.error_class}: {exc}") from exc
        except TimeoutError as exc:
            raise MonitorError(f"{command}: no answer within {timeout:g}s") from exc
        except (StateError, QMPError, EOFError, OSError, AssertionError) as exc:
            # AssertionError: qemu.qmp asserts on its own state when the peer hangs up under a command
            # (a guest powering off): that is a lost connection too, not a bug of ours.
            raise MonitorError(f"{command}: monitor connection lost ({type(exc).__name__})") from exc


@contextlib.asynccontextmanager
async def session(socket: Path, timeout: float = CONNECT_TIMEOUT) -> AsyncIterator[Monitor]:
    """Connect to ``socket`` (greeting and capabilities negotiation within ``timeout``).

    :raise MonitorError: When the socket is missing, refuses, or the greeting does not come in time.
    """
    client = _QuietClient(f"infinization:{socket.parent.name}")
    try:
        await asyncio.wait_for(client.connect(str(socket)), timeout)
    except (ConnectError, QMPError, OSError, TimeoutError, EOFError, AssertionError) as exc:
        # AssertionError: qemu.qmp's handshake asserts its state is still "connecting"; a QEMU that exits
        # during the greeting (a guest powering off while stop presses the button again) breaks that.
        with contextlib.suppress(Exception):
            await client.disconnect()
        reason = "timed out (is another client holding it?)" if isinstance(exc, TimeoutError) else str(exc)
        raise MonitorError(f"cannot connect to QMP monitor {socket}: {reason}") from exc
    try:
        yield Monitor(client, socket)
    finally:
        # After 'quit' the peer is gone: qemu.qmp may raise EOFError here, which means what we wanted.
        with contextlib.suppress(Exception):
            await client.disconnect()


async def peripheral_ids(qmp: Monitor) -> dict[str, str]:
    """Device id -> QOM type of every device that has an id."""
    return peripheral_types(await qmp.execute("qom-list", {"path": "/machine/peripheral"}))


def peripheral_types(entries: list[dict[str, Any]]) -> dict[str, str]:
    """``qom-list /machine/peripheral``'s answer -> device id -> QOM type (pure)."""
    return {e["name"]: e["type"].removeprefix("child<").removesuffix(">")
            for e in entries if e["type"].startswith("child<")}


async def block_nodes(qmp: Monitor) -> set[str]:
    """Names of every block node."""
    return {n["node-name"] for n in await qmp.execute("query-named-block-nodes", {"flat": True})}


async def together(*commands: Awaitable[Any]) -> list[Any]:
    """Run ``commands`` (``Monitor.execute`` calls on one session) pipelined: all are sent at once and QEMU
    answers them in order, so a batch costs about one round trip, not one per command (a busy host may
    take milliseconds to schedule QEMU's monitor for each). The first failure is raised, after every answer
    is in (no command is left running on a session about to close)."""
    answers = await asyncio.gather(*commands, return_exceptions=True)
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return answers


def free_spare_ports(pci: list[dict[str, Any]]) -> list[str]:
    """Spare root ports (``hp-N``) on which nothing is plugged, in order (from a ``query-pci`` answer)."""
    free = []
    for bus in pci:
        for device in bus.get("devices", []):
            qdev = device.get("qdev_id", "")
            bridge = device.get("pci_bridge")
            if qdev.startswith("hp-") and bridge is not None and not bridge.get("devices"):
                free.append(qdev)
    return sorted(free, key=lambda port: int(port.split("-")[1]))
