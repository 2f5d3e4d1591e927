"""Pure parts of fault handling: how a QEMU ended, read from its log when no daemon watched; a device count
past the machine's root ports fails as a refusal, never as ``coroutine raised StopIteration``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from reconciler.errors import Refused
from reconciler.qemu.argv import build_argv
from reconciler.spec.loader import load_text
from reconciler.spec.models import VirtualMachine
from reconciler.state import files
from reconciler.state.layout import StateLayout, VMPaths
from reconciler.state.models import SHUTDOWN_TRACE

MANIFEST = """apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {name: web}
spec:
  machine: {type: q35, accel: [tcg]}
  memory: {size: 256Mi}
  boot: {kernel: /srv/k}
  disks: [DISKS]
"""


def _vm() -> VirtualMachine:
    text = MANIFEST.replace("DISKS", "{name: d0, size: 1Mi}")
    objects, errors = load_text(text, "x")
    assert not errors, errors
    vm = objects[0][0]
    assert isinstance(vm, VirtualMachine)
    return vm


def _launched(tmp_path: Path, log: str | None, traced: bool = True) -> VMPaths:
    paths = StateLayout(tmp_path).vm("web")
    paths.run.mkdir(parents=True)
    vm = _vm()
    argv = build_argv(vm.name, vm.spec, paths)
    assert f"enable={SHUTDOWN_TRACE}" in argv, "QEMU is asked to log why it shuts down"
    if not traced:
        argv = [arg for arg in argv if arg not in ("-trace", f"enable={SHUTDOWN_TRACE}")]
    files.write_launch(paths, argv, vm, uid=1000, binary="/usr/bin/qemu-system-x86_64")
    files.record_launched(paths, 4242, 99)
    if log is not None:
        paths.qemu_log.write_text(log)
    return paths


@pytest.mark.parametrize(("log", "reason", "guest"), [
    (f"{SHUTDOWN_TRACE} reason=6\n", "guest-shutdown", True),
    ("warning: x\n" + f"{SHUTDOWN_TRACE} reason=2\n", "host-qmp-quit", False),
    (f"{SHUTDOWN_TRACE} reason=4\n", "host-signal", False),
    (f"{SHUTDOWN_TRACE} reason=8\n", "guest-panicked", True),
    ("qemu-system-x86_64: terminating\n", "crash", None),
    ("", "crash", None),
    (f"{SHUTDOWN_TRACE} reason=99\n", "cause 99", False),
])
def test_how_qemu_ended_is_read_from_its_log(tmp_path: Path, log: str, reason: str, guest: bool | None) -> None:
    ended = files.exit_from_log(_launched(tmp_path, log))
    assert ended is not None
    assert (ended.reason, ended.guest) == (reason, guest)


def test_only_the_end_of_a_long_log_is_read(tmp_path: Path) -> None:
    noisy = "x" * 200_000 + "\n" + f"{SHUTDOWN_TRACE} reason=6\n"
    ended = files.exit_from_log(_launched(tmp_path, noisy))
    assert ended is not None and ended.reason == "guest-shutdown"


def test_nothing_is_said_without_the_trace_or_a_launch(tmp_path: Path) -> None:
    assert files.exit_from_log(_launched(tmp_path / "a", "", traced=False)) is None
    assert files.exit_from_log(StateLayout(tmp_path / "b").vm("web")) is None


def test_too_many_pcie_devices_is_a_refusal_even_inside_a_coroutine() -> None:
    # Built past the loader (which may refuse 256 disks itself): the executor must fail cleanly anyway.
    one = _vm()
    disk = one.spec.disks[0]
    spec = one.spec.model_copy(update={"disks": [disk.model_copy(update={"name": f"d{i}"}) for i in range(256)]})
    vm = one.model_copy(update={"spec": spec})
    paths = StateLayout(Path("/s")).vm("web")

    async def start() -> list[str]:  # where the executor builds the argv
        return build_argv(vm.name, vm.spec, paths)

    with pytest.raises(Refused, match="more than 255 PCIe root ports"):
        asyncio.run(start())
