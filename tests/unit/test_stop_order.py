"""A stop asks the guest agent first (when QEMU has its port), then presses the ACPI power button."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from reconciler.adapters import procfs
from reconciler.apply import vmprocess
from reconciler.state.layout import StateLayout

PROCESS = procfs.QemuProcess(pid=4242, start_time=1, cmdline=("qemu",))


def _stop(monkeypatch: pytest.MonkeyPatch, agent_answer: str | None, has_port: bool = True) -> tuple[str, list[str]]:
    calls: list[str] = []

    async def shutdown(socket: Path, deadline: float) -> str | None:
        calls.append(f"agent {socket.name}")
        return agent_answer

    async def button(paths: object, pid: int, grace: float) -> bool:
        calls.append("acpi")
        return True

    async def dead(pid: int, timeout: float) -> bool:
        return True

    monkeypatch.setattr(vmprocess.agent, "shutdown", shutdown)
    monkeypatch.setattr(vmprocess, "_press_power_button", button)
    monkeypatch.setattr(vmprocess.procfs, "wait_dead", dead)
    monkeypatch.setattr(vmprocess, "agent_port", lambda paths: has_port)
    how = asyncio.run(vmprocess._stop(StateLayout(Path("/st")).vm("web"), PROCESS, 30.0))
    return how, calls


def test_an_answering_agent_powers_the_guest_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _stop(monkeypatch, None) == ("guest powered off through the guest agent", ["agent qga.sock"])


def test_a_silent_agent_falls_back_to_the_power_button(monkeypatch: pytest.MonkeyPatch) -> None:
    how, calls = _stop(monkeypatch, "the guest agent did not answer within 2s")
    assert how == "guest powered off" and calls == ["agent qga.sock", "acpi"]


def test_without_the_agents_port_only_the_power_button(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _stop(monkeypatch, None, has_port=False) == ("guest powered off", ["acpi"])
