"""What may reach the operator's terminal: text from guests and from names the user typed.

Called by the ``logs`` and ``events`` commands (``printable``) and by every command that takes a VM name
(``vm_name``). A guest's serial console is written by the guest, so it is untrusted: an escape sequence
in it could retitle the window, redefine keys or hide lines in the operator's terminal. ``printable``
keeps text, newlines and tabs, and shows every other control character (C0, DEL, C1), and the invisible
Unicode format characters that reorder or hide text (bidi overrides, zero-width), as a visible
``\\xNN`` / ``\\uNNNN`` escape: ``ESC [ 3 1 m`` prints as ``\\x1b[31m``.
"""

from __future__ import annotations

import re

from pydantic import TypeAdapter, ValidationError

from reconciler.errors import Permanent
from reconciler.spec.models import ResourceName

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]")
_NAME: TypeAdapter[str] = TypeAdapter(ResourceName)


class BadName(Permanent):
    """A VM name on the command line that no manifest could have (``../../x``)."""


def _visible(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` safe for a terminal: CR-LF line ends become LF, every other control character is shown."""
    return _UNSAFE.sub(lambda match: _visible(match.group()), text.replace("\r\n", "\n"))


def vm_name(name: str) -> str:
    """``name`` if a manifest could name a VM so (``metadata.name``'s rules), else BadName."""
    try:
        return _NAME.validate_python(name)
    except ValidationError as exc:
        raise BadName(f"{printable(name)!r} is not a VM name: lowercase letters, digits and '-', at most 40 "
                      "characters") from exc
