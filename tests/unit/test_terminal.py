"""What `infinization logs` and `events` let through to a terminal, and which VM names they accept."""

from __future__ import annotations

import pytest

from reconciler.cli.terminal import BadName, printable, vm_name


def test_escape_sequences_are_shown_not_run() -> None:
    title = "\x1b]0;pwned\x07"
    colour = "\x1b[31mred\x1b[0m"
    assert printable(f"boot {title}{colour}\r\n") == "boot \\x1b]0;pwned\\x07\\x1b[31mred\\x1b[0m\n"


def test_text_newlines_and_tabs_pass_unchanged() -> None:
    text = "INFZ-REPORT seq=1 disks=vda:64Mi\n\tcafé ✓ 日本\n"
    assert printable(text) == text


@pytest.mark.parametrize(("char", "shown"), [
    ("\x00", "\\x00"), ("\r", "\\x0d"), ("\x08", "\\x08"), ("\x7f", "\\x7f"), ("\x9b", "\\x9b"),
    ("\u202e", "\\u202e"), ("\u200b", "\\u200b"), ("\u2028", "\\u2028"), ("\ufeff", "\\ufeff"),
])
def test_every_invisible_or_controlling_character_is_made_visible(char: str, shown: str) -> None:
    assert printable(f"a{char}b") == f"a{shown}b"


@pytest.mark.parametrize("name", ["../../x", "..", "a/b", "A", "", "x" * 41, "a\x1b[31m", "-a"])
def test_names_no_manifest_could_have_are_refused(name: str) -> None:
    with pytest.raises(BadName) as caught:
        vm_name(name)
    assert "\x1b" not in str(caught.value)


def test_manifest_names_pass() -> None:
    assert vm_name("web-1") == "web-1"
