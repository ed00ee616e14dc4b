"""What every command shares: the console, settings with the application's kinds, failing,
and :func:`safe` for every stored value printed through rich.

Imported by each command module; imports none of them, so the command modules form no cycle.
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape

from afterwrite.core.errors import SettingsError

if TYPE_CHECKING:  # pydantic loads only when a command reads its settings: --help stays quick
    from afterwrite.core.settings import Settings

console = Console()

# C0 and C1 controls (ESC, BEL, CR, backspace, CSI …) and DEL, but tab and newline; and the
# bidirectional overrides that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(value: object) -> str:
    """``value`` as text with control characters shown as ``\\xNN`` / ``\\uNNNN``: raw
    ANSI sequences from stored data never reach the terminal (for click.echo)."""
    return _CONTROL.sub(_show, str(value))


def _show(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable_json(text: str) -> str:
    """JSON text (``ensure_ascii=False``) with the control characters JSON leaves raw (C1,
    DEL, bidirectional overrides) written as ``\\uNNNN`` escapes: still the same JSON."""
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def safe(value: object) -> str:
    """Stored data for rich (a table cell, a title, a printed line): control characters shown
    (:func:`printable`) and markup escaped, so ``[/oops]`` or ``[link=…]`` print as
    themselves instead of crashing or styling the output."""
    return escape(printable(value))


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``afterwrite: message`` to stderr and exit with ``code`` (2: usage or setup)."""
    click.echo(f"afterwrite: {message}", err=True)
    sys.exit(code)


def cli_settings(**overrides: Any) -> Settings:
    """Settings for a command, with the application's own kinds (AFTERWRITE_IMPORTS) loaded."""
    from afterwrite.core.kinds import import_kind_modules
    from afterwrite.core.settings import load_settings

    try:
        settings = load_settings(**overrides)
        import_kind_modules(settings.imports)
    except (SettingsError, ImportError) as exc:
        fail(str(exc))
    return settings


def db(settings: Settings) -> Any:
    """An autocommit psycopg connection to the configured database."""
    import psycopg

    try:
        return psycopg.connect(settings.require_database_url(), autocommit=True)
    except SettingsError as exc:
        fail(str(exc))
