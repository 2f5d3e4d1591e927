"""Every file under the state directory has one owner: ``reconciler/state/files.py`` opens it, nobody else.

An AST scan of every module of ``reconciler/`` outside ``reconciler/state/``: no call that reads, writes,
tests or removes a path taken from a state-file attribute of the layout (``paths.record``,
``layout.source``, ``layout.dhcp_leases(name)``...), directly or through a local variable. Handing such a
path to QEMU or dnsmasq in their argv is fine (they own their pidfiles, serial log and leases); opening it
is not: go through ``state.files``.

A variable named like one of those attributes (``pidfile.read_text()``) counts as one too. Not followed: a
path handed to a helper under another parameter name; on the pre-reshape tree (a38e6b2) the scan finds 16
violations in apply/, the CLI and the daemon.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "reconciler"
OWNER = PACKAGE / "state"

# StateLayout / VMPaths attributes that name a file of ours (or one a program we start writes for us).
STATE_FILES = frozenset({"record", "launch", "exit", "restarts", "live", "source", "network_record", "serial",
                         "pidfile", "dhcp_leases", "dhcp_pidfile"})
# Their names, for code that would rebuild a path by hand (``paths.dir / "record.json"``).
STATE_FILE_NAMES = ("record.json", "launch.json", "exit.json", "restarts.json", "live.json", "source.json",
                    "qemu.pid", "serial.log", ".dnsmasq.pid", ".leases")
# Methods that touch a file when called on its path.
PATH_METHODS = frozenset({"read_text", "read_bytes", "write_text", "write_bytes", "open", "unlink", "exists",
                          "stat", "touch", "is_file", "rename", "replace"})
# Functions that touch a file given as an argument.
FUNCTIONS = frozenset({"open", "rmtree", "write_atomic", "unlink", "remove", "stat"})


def _names_a_state_file(node: ast.AST, aliases: set[str]) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr in STATE_FILES:
            return True
        if isinstance(sub, ast.Name) and (sub.id in aliases or sub.id in STATE_FILES):
            return True
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value.endswith(STATE_FILE_NAMES):
            return True
    return False


def _aliases(function: ast.AST) -> set[str]:
    """Names a function binds to a state file's path (``path = paths.record``), to follow them one step."""
    aliases: set[str] = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and _names_a_state_file(node.value, aliases):
            aliases |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return aliases


class _Scan(ast.NodeVisitor):
    """Collects the calls that touch a state file; aliases are per function (``path`` in one function says
    nothing about ``path`` in another)."""

    def __init__(self) -> None:
        self.scopes: list[set[str]] = [set()]
        self.found: list[ast.Call] = []

    def _function(self, node: ast.AST) -> None:
        self.scopes.append(_aliases(node))
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Call(self, node: ast.Call) -> None:
        if _touches(node, self.scopes[-1]):
            self.found.append(node)
        self.generic_visit(node)


def _touches(call: ast.Call, aliases: set[str]) -> bool:
    func = call.func
    if isinstance(func, ast.Attribute) and func.attr in PATH_METHODS and _names_a_state_file(func.value, aliases):
        return True
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    arguments = [*call.args, *(keyword.value for keyword in call.keywords)]
    return name in FUNCTIONS and any(_names_a_state_file(argument, aliases) for argument in arguments)


def violations(source: str, filename: str = "<snippet>") -> list[str]:
    scan = _Scan()
    scan.visit(ast.parse(source, filename))
    return [f"{filename}:{node.lineno}: {ast.unparse(node)}" for node in scan.found]


BAD = '''
import os, shutil
from reconciler.state.files import write_atomic

def exit_reason(paths):
    return json.loads(paths.exit.read_text())

def forget(layout, name):
    os.unlink(layout.vm(name).live)
    path = layout.vm(name).restarts
    path.unlink(missing_ok=True)
    write_atomic(layout.source, "{}")
    with open(layout.dhcp_leases(name)) as f:
        return f.read(), (paths.dir / "launch.json").exists()

def pid(pidfile):
    return int(pidfile.read_text())

def argv(paths):
    return ["-pidfile", str(paths.pidfile), "-chardev", f"file,path={paths.serial}"]
'''


def test_the_scan_finds_every_kind_of_violation() -> None:
    found = violations(BAD)
    assert [line.split(":")[1] for line in found] == ["6", "9", "11", "12", "13", "14", "17"], found


def test_no_module_outside_state_opens_a_state_file() -> None:
    modules = [path for path in sorted(PACKAGE.rglob("*.py")) if OWNER not in path.parents]
    assert len(modules) > 30, "the scan must see the whole package"
    found = [problem for path in modules
             for problem in violations(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))]
    assert not found, "state files opened outside reconciler/state/ (use reconciler.state.files):\n" + "\n".join(found)
