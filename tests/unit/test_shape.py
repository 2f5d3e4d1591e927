"""The code keeps a shape a newcomer can read: no function in ``reconciler/`` above cyclomatic complexity 20
(radon) or longer than 60 lines. Strict, no allow-list: split a function by job rather than raise a limit."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from radon.complexity import cc_visit
from radon.visitors import Class, Function

PACKAGE = Path(__file__).resolve().parents[2] / "reconciler"
MAX_COMPLEXITY = 20
MAX_LINES = 60


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _functions(blocks: list[Function | Class]) -> Iterator[Function]:
    """Every function, method and closure radon measured. ``cc_visit`` lists methods on their own too; a
    class's own score (the mean of its methods) is not a function's."""
    for block in blocks:
        if isinstance(block, Function):
            yield block
            yield from _functions(list(block.closures))


def too_complex(source: str) -> list[str]:
    return [f"{f.fullname} line {f.lineno}: complexity {f.complexity}"
            for f in _functions(cc_visit(source)) if f.complexity > MAX_COMPLEXITY]


def _defs(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function, method and nested function, with its dotted name (``Class.method``)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + child.name, child
            yield from _defs(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _defs(child, f"{prefix}{child.name}.")
        else:
            yield from _defs(child, prefix)


def too_long(source: str) -> list[str]:
    # From the ``def`` line to the last line of the body (docstring and comments count; decorators do not).
    lengths = ((name, node.lineno, (node.end_lineno or node.lineno) - node.lineno + 1)
               for name, node in _defs(ast.parse(source)))
    return [f"{name} line {line}: {length} lines" for name, line, length in lengths if length > MAX_LINES]


def _offenders(check: object) -> list[str]:
    assert callable(check)
    return [f"{path.relative_to(PACKAGE.parent)}: {problem}"
            for path in _modules() for problem in check(path.read_text(encoding="utf-8"))]


def test_the_checks_find_an_offender() -> None:
    branches = "".join(f"    if x == {i}:\n        return {i}\n" for i in range(MAX_COMPLEXITY))
    assert too_complex(f"def f(x):\n{branches}    return -1\n") == ["f line 1: complexity 21"]
    body = "".join(f"    y = {i}\n" for i in range(MAX_LINES))
    assert too_long(f"def g():\n{body}") == [f"g line 1: {MAX_LINES + 1} lines"]
    assert too_complex("def h(x):\n    return x\n") == too_long("def h(x):\n    return x\n") == []


def test_no_function_is_too_complex() -> None:
    offenders = _offenders(too_complex)
    assert not offenders, f"functions above complexity {MAX_COMPLEXITY} (split them by job):\n" + "\n".join(offenders)


def test_no_function_is_too_long() -> None:
    offenders = _offenders(too_long)
    assert not offenders, f"functions longer than {MAX_LINES} lines (split them by job):\n" + "\n".join(offenders)
