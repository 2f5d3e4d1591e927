"""The command line an operator meets first: help with descriptions and examples, usage errors that exit 1,
and shell completion that really completes (bash is driven through its completion function; zsh loads it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["plan", "apply", "status", "sync", "start", "stop", "resume", "events", "logs", "console", "validate",
            "schema", "completion"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], capture_output=True, text=True, cwd=ROOT)


def test_top_level_help_lists_every_command_without_markup() -> None:
    text = build_parser().format_help()
    for command in COMMANDS:
        assert f"\n    {command}" in text, command
    assert "``" not in text and "examples:" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_description_examples_and_argument_help(command: str) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]  # type: ignore[union-attr]
    assert sub.description and len(sub.description) > 40
    assert sub.epilog and sub.epilog.startswith("examples:") and f"infinization {command}" in sub.epilog
    undocumented = [a.dest for a in sub._actions if not a.help and a.dest != "help"]
    assert undocumented == []


@pytest.mark.parametrize("args", [["plan"], ["plan", "--detailed-exitcode"], ["apply", "x", "--bogus"], ["nope"],
                                  ["schema", "pizza"]])
def test_usage_errors_exit_1_not_2(args: list[str]) -> None:
    done = _run(*args)
    assert done.returncode == 1, done
    assert "error:" in done.stderr and "--help" in done.stderr and "Traceback" not in done.stderr


def test_bash_completion_completes_commands_options_and_choices(tmp_path: Path) -> None:
    script = tmp_path / "infinization.bash"
    script.write_text(_run("completion", "bash").stdout)
    probe = f"""
source {script}
complete_it() {{ COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=();
  _shtab_infinization infinization "${{COMP_WORDS[-1]}}" "${{COMP_WORDS[-2]}}"; echo "${{COMPREPLY[*]}}"; }}
complete_it infinization ap
complete_it infinization plan --det
complete_it infinization schema ''
complete_it infinization completion ''
"""
    lines = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines == ["apply", "--detailed-exitcode", "manifest plan apply", "bash zsh"]


@pytest.mark.skipif(shutil.which("zsh") is None and not Path("/usr/bin/zsh").exists(), reason="zsh not installed")
def test_zsh_completion_loads_through_fpath(tmp_path: Path) -> None:
    (tmp_path / "_infinization").write_text(_run("completion", "zsh").stdout)
    subprocess.run(["zsh", "-n", str(tmp_path / "_infinization")], check=True)
    found = subprocess.run(["zsh", "-fc", f"fpath=({tmp_path} $fpath); autoload -U compinit; "
                            f"compinit -u -d {tmp_path}/.zcompdump; print -r -- ${{_comps[infinization]}}"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found == "_infinization"
