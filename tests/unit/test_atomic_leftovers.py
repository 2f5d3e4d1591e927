"""write_atomic and the boot-file copy remove the temporary files of writers killed mid-write, never a live
writer's."""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.state.files import install_boot_copy, write_atomic


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_a_dead_writers_temp_file_is_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    dead = tmp_path / f".record.json.{_dead_pid()}.abc123.tmp"
    live = tmp_path / f".record.json.{os.getppid()}.def456.tmp"
    other = tmp_path / f".launch.json.{_dead_pid()}.abc123.tmp"
    for leftover in (dead, live, other):
        leftover.write_text("half")
    write_atomic(target, "whole\n")
    assert target.read_text() == "whole\n"
    assert not dead.exists()
    assert live.exists()  # its writer still runs: it may be about to rename it
    assert other.exists()  # another file's: that file's next write cleans it


def test_a_kernel_copy_left_by_a_killed_run_is_removed_by_the_next_copy(tmp_path: Path) -> None:
    # VMs start side by side: a run killed while another VM copied its kernel left this half copy.
    source = tmp_path / "vmlinuz"
    source.write_bytes(b"kernel" * 1000)
    run = tmp_path / "run"
    run.mkdir()
    dest = run / "kernel"
    dead = run / f".kernel.{_dead_pid()}.4qi40wfw.tmp"
    dead.write_bytes(b"kern")
    install_boot_copy(str(source), dest, os.getuid(), os.getgid())
    assert dest.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in run.iterdir()) == ["kernel"]
