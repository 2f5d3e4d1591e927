"""A short-lived client of the QEMU guest agent (qemu-ga), over the VM's ``run/qga.sock``, with deadlines.

QEMU listens on that socket and relays bytes to the guest's virtio-serial port ``org.qemu.guest_agent.0``.
Whether anything in the guest answers is unknown until it does: every call here is bounded by one overall
deadline (a guest without an agent, or one still booting, is "not answering", never a hang). QEMU serves one
client at a time; a second one waits, and so times out here too.

The protocol is QMP-like JSON, one object per line, without a greeting. A previous client may have left a
half-read answer in the pipe, so each session starts with ``guest-sync`` and a random id and skips every line
until the answer that echoes that id. ``guest-shutdown`` sends no answer when it works (the guest goes away).
The observer uses ``query`` (status), the executor ``shutdown`` (the first try of a graceful stop);
``freeze`` / ``thaw`` / ``fsfreeze_status`` and the ``frozen`` context manager are for snapshots (the
filesystems frozen while the disks are copied).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from reconciler.plan.observed import ObservedAgent

DEADLINE = 2.0
_MAX_LINE = 1024 * 1024
_RESET = b"\xff"  # makes qemu-ga drop a half-parsed request (its documented parser reset)


class AgentError(Exception):
    """The agent did not answer in time, answered with an error, or the socket is not there."""


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self.writer.write(json.dumps(message).encode() + b"\n")
        await self.writer.drain()

    async def answer(self, command: str, skip_errors: bool = False) -> Any:
        """The next answer (``return`` value) that is JSON; ``AgentError`` for an ``error`` answer (or skip it)."""
        while True:
            line = await self.reader.readline()
            if not line:
                raise AgentError(f"{command}: the agent's socket closed")
            try:
                message = json.loads(line.strip(_RESET + b" \r\n"))
            except ValueError:
                continue  # noise: a reset byte, a stale half line
            if isinstance(message, dict) and "error" in message and not skip_errors:
                raise AgentError(f"{command}: {message['error'].get('desc', message['error'])}")
            if isinstance(message, dict) and "return" in message:
                return message["return"]

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        await self.send(command, arguments)
        return await self.answer(command)

    async def sync(self) -> None:
        """Skip whatever an earlier client left unread: wait for the answer that echoes our random id.
        Errors before it are skipped too: a real qemu-ga answers the reset byte itself with a parse error
        ("JSON parse error, stray '\\xff'") before it answers the guest-sync."""
        token = random.randint(1, 2**31 - 1)
        self.writer.write(_RESET)
        await self.send("guest-sync", {"id": token})
        while await self.answer("guest-sync", skip_errors=True) != token:
            pass


@contextlib.asynccontextmanager
async def _session(socket: Path) -> AsyncIterator[_Session]:
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket), limit=_MAX_LINE)
    except OSError as exc:
        raise AgentError(f"cannot connect to {socket}: {exc.strerror or exc}") from exc
    try:
        session = _Session(reader, writer)
        await session.sync()
        yield session
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def addresses(interfaces: Any) -> list[str]:
    """``address/prefix`` of every interface but loopback, from a ``guest-network-get-interfaces`` answer."""
    found = []
    for interface in interfaces if isinstance(interfaces, list) else []:
        if not isinstance(interface, dict) or interface.get("name") == "lo":
            continue
        for address in interface.get("ip-addresses") or []:
            ip, prefix = address.get("ip-address"), address.get("prefix")
            if ip and not str(ip).startswith(("127.", "::1", "fe80:")):
                found.append(f"{ip}/{prefix}" if prefix is not None else str(ip))
    return found


def os_name(info: Any) -> str | None:
    if not isinstance(info, dict):
        return None
    name = info.get("pretty-name") or info.get("name")
    return str(name) if name else None


FROZEN = "the guest's filesystems are frozen (fsfreeze): no addresses or OS until they are thawed"


async def _ask(socket: Path) -> ObservedAgent:
    async with _session(socket) as agent:
        await agent.execute("guest-ping")
        try:
            interfaces = await agent.execute("guest-network-get-interfaces")
        except AgentError:
            # A frozen agent refuses every command but a few (ping, sync, fsfreeze-*): it answers, and says why.
            if await agent.execute("guest-fsfreeze-status") == "frozen":
                return ObservedAgent(answering=True, detail=FROZEN)
            raise
        try:
            info = await agent.execute("guest-get-osinfo")
        except AgentError:  # an old agent, or one that may not read /etc/os-release
            info = None
    return ObservedAgent(answering=True, addresses=addresses(interfaces), os=os_name(info))


async def query(socket: Path, deadline: float = DEADLINE) -> ObservedAgent:
    """What the agent says (ping, then the guest's addresses and OS), or ``answering=False`` with why."""
    try:
        return await asyncio.wait_for(_ask(socket), deadline)
    except TimeoutError:
        return ObservedAgent(answering=False, detail=f"no answer within {deadline:g}s")
    except AgentError as exc:
        return ObservedAgent(answering=False, detail=str(exc))


async def _shutdown(socket: Path) -> None:
    async with _session(socket) as agent:
        await agent.execute("guest-ping")
        await agent.send("guest-shutdown", {"mode": "powerdown"})


async def shutdown(socket: Path, deadline: float = DEADLINE) -> str | None:
    """Ask the agent to power the guest off; ``None`` when it took the request, else why not (the caller
    goes on with the ACPI power button)."""
    try:
        await asyncio.wait_for(_shutdown(socket), deadline)
    except TimeoutError:
        return f"the guest agent did not answer within {deadline:g}s"
    except AgentError as exc:
        return str(exc)
    return None


# Freezing and thawing the guest's filesystems (for consistent snapshots). qemu-ga's fsfreeze-freeze syncs
# every filesystem before freezing it, so it gets a longer deadline than a ping. A frozen guest stays frozen
# until someone thaws it (qemu-ga has no timeout of its own on Linux): a freeze whose answer is lost may still
# have frozen the guest, so every failed freeze is followed by a thaw, and ``frozen`` thaws on every exit.
FREEZE_DEADLINE = 20.0


async def _one(socket: Path, command: str, arguments: dict[str, Any] | None) -> Any:
    async with _session(socket) as agent:
        return await agent.execute(command, arguments)


async def call(socket: Path, command: str, arguments: dict[str, Any] | None = None,
               deadline: float = DEADLINE) -> Any:
    """One command in its own session, bounded by ``deadline``: its ``return`` value; ``AgentError`` on
    timeout or an error answer. (Not for guest-shutdown, which never answers.)"""
    try:
        return await asyncio.wait_for(_one(socket, command, arguments), deadline)
    except TimeoutError as exc:
        raise AgentError(f"{command}: no answer within {deadline:g}s") from exc


async def fsfreeze_status(socket: Path, deadline: float = DEADLINE) -> str:
    """``"frozen"`` or ``"thawed"``, as the agent says."""
    return str(await call(socket, "guest-fsfreeze-status", deadline=deadline))


async def thaw(socket: Path, deadline: float = DEADLINE) -> int:
    """Thaw the guest's filesystems; return how many were thawed (0: none was frozen)."""
    return int(await call(socket, "guest-fsfreeze-thaw", deadline=deadline))


async def freeze(socket: Path, deadline: float = FREEZE_DEADLINE) -> int:
    """Freeze the guest's filesystems; return how many. On any failure a thaw is attempted (the freeze may
    have happened even though its answer did not come back) and ``AgentError`` says both outcomes."""
    try:
        return int(await call(socket, "guest-fsfreeze-freeze", deadline=deadline))
    except AgentError as exc:
        try:
            thawed = await thaw(socket)
        except AgentError as thaw_error:
            raise AgentError(f"{exc}; and the thaw after it failed: {thaw_error}") from exc
        raise AgentError(f"{exc} (thawed {thawed} filesystem(s) after it)") from exc


@contextlib.asynccontextmanager
async def frozen(socket: Path, deadline: float = FREEZE_DEADLINE) -> AsyncIterator[int]:
    """``async with frozen(socket) as count:`` the guest's filesystems stay frozen inside the block (take the
    disk snapshot there) and are thawed on every way out; a thaw that fails raises ``AgentError``."""
    count = await freeze(socket, deadline)
    try:
        yield count
    finally:
        await thaw(socket)
