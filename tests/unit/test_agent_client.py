"""The guest agent client against a fake qemu-ga on a unix socket: what it asks, what it reads back, and
that a silent or broken agent is "not answering" within the deadline, never a hang."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from reconciler.adapters import agent

INTERFACES = [
    {"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
    {"name": "eth0", "hardware-address": "52:54:00:00:00:01", "ip-addresses": [
        {"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24},
        {"ip-address-type": "ipv6", "ip-address": "fe80::5054:ff:fe00:1", "prefix": 64},
        {"ip-address-type": "ipv6", "ip-address": "fd00::15", "prefix": 64}]},
]
OSINFO = {"id": "debian", "name": "Debian GNU/Linux", "pretty-name": "Debian GNU/Linux 12 (bookworm)"}

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _qga(seen: list[str], stale: bytes = b"", osinfo: bool = True, hang_on: str = "") -> Handler:
    """A fake agent: answers guest-sync, guest-ping, the two queries and fsfreeze (keeping a frozen state),
    records what it was asked; never answers ``hang_on``."""
    state = {"frozen": False}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await answer_all(reader, writer)
        finally:
            writer.close()

    async def answer_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(stale)  # what an earlier client left unread
        while line := await reader.readline():
            if line.startswith(b"\xff"):  # qemu-ga's parser reset answers the byte itself with an error
                writer.write(b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \\u00ff"}}\n')
            request = json.loads(line.strip(b"\xff \n"))
            seen.append(request["execute"])
            answer: dict[str, Any] = {
                "guest-sync": {"return": request.get("arguments", {}).get("id")},
                "guest-ping": {"return": {}},
                "guest-network-get-interfaces": {"return": INTERFACES},
                "guest-get-osinfo": {"return": OSINFO} if osinfo else {
                    "error": {"class": "CommandNotFound", "desc": "The command guest-get-osinfo has not been found"}},
            }.get(request["execute"], {})
            if request["execute"] == "guest-shutdown":
                return
            if state["frozen"] and request["execute"] not in ("guest-sync", "guest-ping") \
                    and not request["execute"].startswith("guest-fsfreeze"):
                answer = {"error": {"class": "GenericError", "desc": f"Command {request['execute']} has been "
                                    "disabled: the agent is in frozen state"}}
            if request["execute"].startswith("guest-fsfreeze"):
                answer = {"return": _fsfreeze(state, request["execute"])}
                if request["execute"] == hang_on:
                    continue  # the command happened, its answer is lost
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()

    return serve


def _fsfreeze(state: dict[str, bool], command: str) -> object:
    if command == "guest-fsfreeze-status":
        return "frozen" if state["frozen"] else "thawed"
    was, state["frozen"] = state["frozen"], command == "guest-fsfreeze-freeze"
    return 2 if state["frozen"] or was else 0


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.read()  # QEMU's socket with no agent behind the port: it reads, nobody answers
    finally:
        writer.close()


def _with(tmp_path: Path, handler: Handler, call: Callable[[Path], Awaitable[Any]]) -> Any:
    path = tmp_path / "qga.sock"

    async def run() -> Any:
        server = await asyncio.start_unix_server(handler, str(path))
        async with server:
            return await call(path)

    return asyncio.run(run())


def test_an_answering_agent_gives_addresses_and_os(tmp_path: Path) -> None:
    seen: list[str] = []
    found = _with(tmp_path, _qga(seen, stale=b'{"return": {"half": "of an old answer"}}\n{"return": 7}\n'),
                  agent.query)
    assert found.answering is True
    assert found.addresses == ["10.0.2.15/24", "fd00::15/64"]
    assert found.os == "Debian GNU/Linux 12 (bookworm)"
    assert seen == ["guest-sync", "guest-ping", "guest-network-get-interfaces", "guest-get-osinfo"]


def test_an_agent_without_osinfo_still_answers(tmp_path: Path) -> None:
    found = _with(tmp_path, _qga([], osinfo=False), agent.query)
    assert found.answering is True and found.os is None and found.addresses


def test_a_silent_agent_is_not_answering_within_the_deadline(tmp_path: Path) -> None:
    started = time.monotonic()
    found = _with(tmp_path, _silent, lambda path: agent.query(path, deadline=0.5))
    assert time.monotonic() - started < 2
    assert found.answering is False and found.detail == "no answer within 0.5s"


def test_a_missing_socket_is_not_answering(tmp_path: Path) -> None:
    found = asyncio.run(agent.query(tmp_path / "absent.sock", deadline=0.5))
    assert found.answering is False and "cannot connect" in found.detail


def test_shutdown_pings_then_asks_for_a_powerdown(tmp_path: Path) -> None:
    seen: list[str] = []
    assert _with(tmp_path, _qga(seen), agent.shutdown) is None
    assert seen == ["guest-sync", "guest-ping", "guest-shutdown"]
    refused = _with(tmp_path, _silent, lambda path: agent.shutdown(path, deadline=0.3))
    assert refused == "the guest agent did not answer within 0.3s"


def test_freeze_thaw_and_status(tmp_path: Path) -> None:
    seen: list[str] = []

    async def steps(path: Path) -> list[object]:
        frozen = await agent.freeze(path)
        during = await agent.fsfreeze_status(path)
        thawed = await agent.thaw(path)
        return [frozen, during, thawed, await agent.fsfreeze_status(path)]

    assert _with(tmp_path, _qga(seen), steps) == [2, "frozen", 2, "thawed"]
    assert [c for c in seen if c != "guest-sync"] == ["guest-fsfreeze-freeze", "guest-fsfreeze-status",
                                                      "guest-fsfreeze-thaw", "guest-fsfreeze-status"]


def test_a_freeze_without_answer_is_thawed_and_reported(tmp_path: Path) -> None:
    seen: list[str] = []

    async def steps(path: Path) -> tuple[str, str]:
        try:
            await agent.freeze(path, deadline=0.3)
        except agent.AgentError as exc:
            return str(exc), await agent.fsfreeze_status(path)
        raise AssertionError("the freeze did not fail")

    error, after = _with(tmp_path, _qga(seen, hang_on="guest-fsfreeze-freeze"), steps)
    assert "no answer within 0.3s" in error and "thawed 2 filesystem(s)" in error
    assert after == "thawed" and "guest-fsfreeze-thaw" in seen


def test_frozen_thaws_when_the_block_fails(tmp_path: Path) -> None:
    async def steps(path: Path) -> str:
        try:
            async with agent.frozen(path) as count:
                assert count == 2 and await agent.fsfreeze_status(path) == "frozen"
                raise RuntimeError("the snapshot failed")
        except RuntimeError:
            return await agent.fsfreeze_status(path)

    assert _with(tmp_path, _qga([]), steps) == "thawed"


def test_freeze_of_a_silent_agent_fails_within_its_deadlines(tmp_path: Path) -> None:
    async def steps(path: Path) -> str:
        try:
            await agent.freeze(path, deadline=0.3)
        except agent.AgentError as exc:
            return str(exc)
        return "no error"

    error = _with(tmp_path, _silent, steps)
    assert "no answer within 0.3s" in error and "the thaw after it failed" in error


def test_a_frozen_agent_answers_and_says_it_is_frozen(tmp_path: Path) -> None:
    async def steps(path: Path) -> object:
        async with agent.frozen(path):
            return await agent.query(path)

    found = _with(tmp_path, _qga([]), steps)
    assert found.answering is True and found.detail == agent.FROZEN and found.addresses == []
