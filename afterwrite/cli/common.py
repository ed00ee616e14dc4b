"""What every command shares: the console, settings with the application's kinds, failing.

Imported by each command module; imports none of them, so the command modules form no cycle.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console

from afterwrite.core.errors import SettingsError

if TYPE_CHECKING:  # pydantic loads only when a command reads its settings: --help stays quick
    from afterwrite.core.settings import Settings

console = Console()


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
