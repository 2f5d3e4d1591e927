"""Sizes as QEMU reads them: 1024-based, with one canonical form (an int of bytes).

``512M``, ``512Mi``, ``512MiB`` and ``536870912`` are the same size, so a manifest that switches between
them produces an empty plan. Used by the spec models; ``format_size`` renders sizes for people.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_UNITS: dict[str, int] = {
    "": 1,
    "B": 1,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "T": 1024**4,
    "P": 1024**5,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([KMGTP])(?:i?B?)?|(B))?\s*$", re.IGNORECASE)
MAX_SIZE = 2**63 - 1  # QEMU and qemu-img parse sizes as signed 64-bit numbers
SIZE_HELP = "a size in bytes, or a number with a 1024-based unit: K, M, G, T (also Ki/KiB, Mi/MiB, ...)"


def parse_size(value: object) -> int:
    """Return the size in bytes; raise ValueError with a message fit for the user."""
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_HELP}, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return _checked(value)
    if not isinstance(value, str):
        raise ValueError(f"expected {SIZE_HELP}, got {type(value).__name__}")
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"invalid size {value!r}: expected {SIZE_HELP}")
    number, unit, bare_b = match.groups()
    multiplier = _UNITS[(unit or bare_b or "").upper()]
    try:
        total = Decimal(number) * multiplier
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"invalid size {value!r}") from exc
    if total != total.to_integral_value():
        raise ValueError(f"invalid size {value!r}: it is not a whole number of bytes")
    return _checked(int(total))


def _checked(size: int) -> int:
    if size > MAX_SIZE:
        raise ValueError(f"size {size} is over {MAX_SIZE} bytes, the most QEMU can express (a signed 64-bit number)")
    return size


def format_size(size: int) -> str:
    """The shortest exact 1024-based form: 536870912 -> '512Mi', 1000 -> '1000'."""
    for suffix, multiplier in (("Pi", 1024**5), ("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if size >= multiplier and size % multiplier == 0:
            return f"{size // multiplier}{suffix}"
    return str(size)


Size = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?\s*([KMGTPkmgtp](i?B?)?|B)?$"},
            ],
            "description": SIZE_HELP,
        }
    ),
]
"""A byte count that accepts QEMU's 1024-based suffixes; serialises to JSON in its shortest exact form."""
