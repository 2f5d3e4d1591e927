"""A process is a VM's QEMU only when everything launch.json recorded matches /proc (issue 9): a live
process whose pidfile entry, uid, executable, start time or argv differ is not adopted, and says why."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.adapters import procfs
from reconciler.spec.loader import load_text
from reconciler.spec.models import VirtualMachine
from reconciler.state import files
from reconciler.state.layout import StateLayout, VMPaths
from reconciler.state.models import LaunchRecord

VM = """apiVersion: infinization.io/v1alpha1
kind: VirtualMachine
metadata: {name: a}
spec: {memory: {size: 64Mi}}
"""
SLEEP = shutil.which("sleep") or "/bin/sleep"


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[VMPaths, subprocess.Popen[bytes]]]:
    paths = StateLayout(tmp_path).vm("a")
    paths.run.mkdir(parents=True)
    child = subprocess.Popen([SLEEP, "60"])
    try:
        yield paths, child
    finally:
        child.kill()
        child.wait()


def _vm() -> VirtualMachine:
    objects, errors = load_text(VM, "x")
    assert not errors and isinstance(objects[0][0], VirtualMachine)
    return objects[0][0]


def _launched(paths: VMPaths, pid: int, *, uid: int | None = None, binary: str | None = None,
              argv: list[str] | None = None, start: int | None = None) -> None:
    files.write_launch(paths, argv or [SLEEP, "60"], _vm(), uid=os.getuid() if uid is None else uid,
                       binary=binary or os.path.realpath(SLEEP))
    began = procfs.start_time(pid)
    assert began is not None
    files.record_launched(paths, pid, began if start is None else start)
    paths.pidfile.write_text(f"{pid}\n")


def test_a_process_that_matches_every_record_is_adopted(running: tuple[VMPaths, subprocess.Popen[bytes]]) -> None:
    paths, child = running
    _launched(paths, child.pid)
    examined = procfs.examine(paths)
    assert examined.unverified is None and examined.process is not None and examined.process.pid == child.pid


@pytest.mark.parametrize(("change", "why"), [
    ({"uid": 995}, "it runs as uid"),
    ({"binary": "/usr/bin/qemu-system-x86_64"}, "its executable is"),
    ({"argv": [SLEEP, "61"]}, "its command line is not the one we launched"),
    ({"start": 1}, "start time"),
])
def test_a_process_that_differs_in_one_way_is_not_adopted_and_says_why(
        running: tuple[VMPaths, subprocess.Popen[bytes]], change: dict[str, object], why: str) -> None:
    paths, child = running
    _launched(paths, child.pid, **change)  # type: ignore[arg-type]
    examined = procfs.examine(paths)
    assert examined.process is None and procfs.find_qemu(paths) is None
    assert examined.unverified is not None and why in examined.unverified, examined.unverified
    assert examined.pid == child.pid


def test_without_a_completed_launch_record_nothing_is_adopted(
        running: tuple[VMPaths, subprocess.Popen[bytes]]) -> None:
    paths, child = running
    paths.pidfile.write_text(f"{child.pid}\n")
    assert "no launch record" in (procfs.examine(paths).unverified or "")
    files.write_launch(paths, [SLEEP, "60"], _vm(), uid=os.getuid(), binary=SLEEP)  # pid not recorded yet
    assert procfs.examine(paths).process is None


def test_a_launch_record_without_a_pid_names_only_a_process_started_after_it(
        running: tuple[VMPaths, subprocess.Popen[bytes]]) -> None:
    """A start interrupted between the launch and its record: the process its pidfile names is adopted when it
    started after launch.json was written and matches the rest; one started before never is."""
    paths, before = running
    files.wait_next_tick(files.write_launch(paths, [SLEEP, "60"], _vm(), uid=os.getuid(), binary=SLEEP))
    after = subprocess.Popen([SLEEP, "60"])
    try:
        paths.pidfile.write_text(f"{before.pid}\n")
        examined = procfs.examine(paths)
        assert examined.process is None and "not started by the launch" in (examined.unverified or "")
        paths.pidfile.write_text(f"{after.pid}\n")
        examined = procfs.examine(paths)
        assert examined.process is not None and examined.process.pid == after.pid and not examined.recorded
        began = procfs.start_time(after.pid)
        assert began is not None
        files.record_launched(paths, after.pid, began)
        examined = procfs.examine(paths)
        assert examined.process is not None and examined.recorded
    finally:
        after.kill()
        after.wait()


@pytest.mark.parametrize(("change", "why"), [
    ({"uid": 995}, "it runs as uid"),
    ({"binary": "/usr/bin/qemu-system-x86_64"}, "its executable is"),
    ({"argv": [SLEEP, "61"]}, "its command line is not the one we launched"),
])
def test_a_launch_record_without_a_pid_still_checks_everything_else(
        tmp_path: Path, change: dict[str, object], why: str) -> None:
    paths = StateLayout(tmp_path).vm("a")
    paths.run.mkdir(parents=True)
    record = {"uid": os.getuid(), "binary": SLEEP, "argv": [SLEEP, "60"], **change}
    files.wait_next_tick(files.write_launch(paths, record.pop("argv"), _vm(), **record))  # type: ignore[arg-type]
    child = subprocess.Popen([SLEEP, "60"])
    try:
        paths.pidfile.write_text(f"{child.pid}\n")
        examined = procfs.examine(paths)
        assert examined.process is None and why in (examined.unverified or ""), examined.unverified
    finally:
        child.kill()
        child.wait()


def test_a_launch_record_without_a_pid_names_nothing_forked_after_its_launch_window(tmp_path: Path) -> None:
    """The pid-less record is only the launch's: a matching process forked long after it was written (the
    record left behind, a process of QEMU's user started later with that argv) is not adopted."""
    paths = StateLayout(tmp_path).vm("a")
    paths.run.mkdir(parents=True)
    child = subprocess.Popen([SLEEP, "60"])
    try:
        began = procfs.start_time(child.pid)
        assert began is not None
        late = began - int((procfs.LAUNCH_WINDOW + 1) * os.sysconf("SC_CLK_TCK"))
        files.write_atomic(paths.launch, LaunchRecord(argv=[SLEEP, "60"], vm=_vm(), uid=os.getuid(), binary=SLEEP,
                                                      not_before=late).model_dump_json())
        paths.pidfile.write_text(f"{child.pid}\n")
        examined = procfs.examine(paths)
        assert examined.process is None and "not started by the launch" in (examined.unverified or "")
        assert not procfs.launched_from(files.read_launch(paths))  # type: ignore[arg-type]
    finally:
        child.kill()
        child.wait()


def test_a_start_waits_for_an_interrupted_launchs_qemu_to_write_its_pidfile(tmp_path: Path) -> None:
    """A start right after a crash: the launched process runs but has not written its pidfile yet. The start
    waits until it does (and is then adopted); with no such process it does not wait at all."""
    from reconciler.apply.vmprocess import settle_interrupted_launch

    paths = StateLayout(tmp_path).vm("a")
    paths.run.mkdir(parents=True)
    files.wait_next_tick(files.write_launch(paths, [SLEEP, "60"], _vm(), uid=os.getuid(), binary=SLEEP))
    began = time.monotonic()
    asyncio.run(settle_interrupted_launch(paths))
    assert time.monotonic() - began < 0.5, "no process of that launch runs: nothing to wait for"
    child = subprocess.Popen([SLEEP, "60"])
    try:
        async def settle_while_the_pidfile_comes() -> float:
            async def write_pidfile() -> None:
                await asyncio.sleep(0.3)
                paths.pidfile.write_text(f"{child.pid}\n")
            writer = asyncio.create_task(write_pidfile())
            began = time.monotonic()
            await settle_interrupted_launch(paths)
            await writer
            return time.monotonic() - began
        waited = asyncio.run(settle_while_the_pidfile_comes())
        assert 0.3 <= waited < procfs.LAUNCH_WINDOW
        found = procfs.find_qemu(paths)
        assert found is not None and found.pid == child.pid
    finally:
        child.kill()
        child.wait()


def test_a_launch_record_without_a_pid_or_a_clock_names_nothing(tmp_path: Path) -> None:
    """launch.json from before records had a clock: a pid-less one is never completed (as it always was)."""
    paths = StateLayout(tmp_path).vm("a")
    paths.run.mkdir(parents=True)
    child = subprocess.Popen([SLEEP, "60"])
    try:
        files.write_atomic(paths.launch, LaunchRecord(argv=[SLEEP, "60"], vm=_vm(), uid=os.getuid(),
                                                      binary=SLEEP).model_dump_json())
        paths.pidfile.write_text(f"{child.pid}\n")
        assert "no launch record names it" in (procfs.examine(paths).unverified or "")
    finally:
        child.kill()
        child.wait()


def test_a_deleted_pidfile_falls_back_to_launch_json_with_every_other_check(
        running: tuple[VMPaths, subprocess.Popen[bytes]]) -> None:
    paths, child = running
    _launched(paths, child.pid)
    paths.pidfile.unlink()  # deleted by hand: the QEMU still runs, launch.json (root's) still names it
    examined = procfs.examine(paths)
    assert examined.process is not None and examined.process.pid == child.pid
    _launched(paths, child.pid, argv=[SLEEP, "61"])
    paths.pidfile.unlink()
    assert procfs.examine(paths).process is None, "the other checks still apply"


def test_a_pidfile_that_is_a_symlink_is_not_followed(running: tuple[VMPaths, subprocess.Popen[bytes]],
                                                     tmp_path: Path) -> None:
    paths, child = running
    _launched(paths, child.pid)
    target = tmp_path / "elsewhere"
    target.write_text(f"{child.pid}\n")
    paths.pidfile.unlink()
    paths.pidfile.symlink_to(target)
    assert files.read_pidfile(paths.pidfile) is None
    assert procfs.examine(paths).process is None


def test_sigkill_reaches_only_a_process_that_still_proves_it_is_ours(
        running: tuple[VMPaths, subprocess.Popen[bytes]]) -> None:
    from reconciler.apply.vmprocess import _kill

    paths, child = running
    _launched(paths, child.pid)
    process = procfs.find_qemu(paths)
    assert process is not None
    files.write_launch(paths, [SLEEP, "60"], _vm(), uid=os.getuid(), binary=SLEEP)  # no longer proven ours
    _kill(process, paths)
    assert child.poll() is None, "an unverified process is never signalled"
    _launched(paths, child.pid)
    _kill(process, paths)
    assert child.wait(timeout=5) == -9
