"""Stored values printed through rich: markup escaped, control characters shown, not sent."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console
from rich.table import Table

from afterwrite.cli.common import printable, printable_json, safe

_SGR = re.compile(r"\x1b\[[0-9;]*m")
HOSTILE = [
    "[/oops]",
    "[/boom]",
    "[link=https://evil.example]click[/link]",
    "[bold red]alarm[/]",
    "\x1b[2J\x1b[31mred\x1b[0m",
    "\x1b]8;;https://evil.example\x1b\\text\x1b]8;;\x1b\\ after",
    "back\\[slash]",
    "csi\x9b31m bell\x07 cr\rdel\x7f rtl\u202eevil",
]


def _render(cell: str) -> str:
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=True, color_system="truecolor")
    table = Table(title=safe("title " + cell))
    table.add_column("value")
    table.add_row(safe(cell))
    console.print(table)
    console.print(f"[yellow]label[/]: {safe(cell)}")
    return out.getvalue()


@pytest.mark.parametrize("value", HOSTILE)
def test_stored_values_print_as_themselves(value: str) -> None:
    rendered = _render(value)  # would raise MarkupError for "[/oops]" unescaped
    # rich's own colours aside, no escape sequence reaches the terminal: no hyperlink (OSC 8),
    # no screen clearing, no colour from the value
    plain = _SGR.sub("", rendered)
    assert "\x1b" not in plain
    for control in "\x07\x7f\x9b\r\u202e":
        assert control not in plain
    # the text itself, markup and all, literally: in the cell and in the printed line
    assert f"│ {printable(value)} │" in plain
    assert f"label: {printable(value)}\n" in plain


def test_printable_keeps_ordinary_text() -> None:
    text = "ünïcödé 世界 😀 tab\tnewline\n [brackets] and \\ backslash"
    assert printable(text) == text
    assert printable("\x1b[31m") == "\\x1b[31m"
    assert printable("\u202e") == "\\u202e"
    assert printable(None) == "None"


def test_printable_json_stays_the_same_json() -> None:
    value = {"k": "a\x9b\x7f\u202eb\x1b", "é": "ü"}
    text = printable_json(json.dumps(value, ensure_ascii=False))
    assert json.loads(text) == value
    assert not any(c in text for c in "\x9b\x7f\u202e\x1b")
