"""What every command shares: the console, settings with the application's kinds, failing,
:func:`safe` for every stored value printed through rich, and the one message for a database
without afterwrite's schema.

Imported by each command module; imports none of them, so the command modules form no cycle.
"""

from __future__ import annotations

import re
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape

from afterwrite.core.errors import ConfigurationError, SettingsError, TransientError
from afterwrite.worker.operations.schema import SCHEMA_MISSING, missing_tables

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


EXIT_SETUP = 2
"""Exit code of a usage or setup problem (a bad setting, a database that was never migrated)."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``afterwrite: message`` to stderr and exit with ``code`` (2: usage or setup)."""
    click.echo(f"afterwrite: {message}", err=True)
    sys.exit(code)


def cli_time(value: str, now: datetime) -> datetime:
    """A ``--since``/``--until`` value (ISO time or an age such as ``2h``, ``7d``) as a UTC
    time; a bad one ends the command with a message."""
    from afterwrite.worker.operations.dead_letter_admin import parse_time

    try:
        return parse_time(value, now=now)
    except ValueError as exc:
        fail(str(exc))


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


# --- a database without afterwrite's schema ---------------------------------------------------
def is_schema_error(exc: BaseException) -> bool:
    """``exc`` (or what it wraps: SQLAlchemy's ``orig``, a cause) is PostgreSQL saying a table
    or column afterwrite uses does not exist: the schema was never migrated, or is older than
    this code."""
    import psycopg.errors

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
            return True
        todo += [getattr(e, "orig", None), e.__cause__, e.__context__]
    return False


def require_schema(settings: Settings) -> None:
    """Exit 2 with :data:`SCHEMA_MISSING` when afterwrite's tables are not all there. A
    database that cannot be reached is left to the command, which reports it its own way."""
    import psycopg

    try:
        with psycopg.connect(
            settings.require_database_url(), autocommit=True, connect_timeout=5
        ) as conn:
            missing = missing_tables(conn)
    except SettingsError as exc:
        fail(str(exc))
    except psycopg.OperationalError:
        return
    if missing:
        fail(SCHEMA_MISSING, EXIT_SETUP)


class Group(click.Group):
    """The ``afterwrite`` group: a command that meets a missing table or column prints
    :data:`SCHEMA_MISSING` and exits 2, instead of a traceback; so does any other
    configuration error (:class:`afterwrite.ConfigurationError`), with its message. Sub-groups
    (``dlq``, ``index``) run inside this one's ``invoke``, so one place covers every command."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if is_schema_error(exc):
                fail(SCHEMA_MISSING, EXIT_SETUP)
            if isinstance(exc, ConfigurationError):
                fail(str(exc), EXIT_SETUP)
            unreachable = unreachable_service(exc)
            if unreachable is not None:
                fail(unreachable, EXIT_UNAVAILABLE)
            raise


EXIT_UNAVAILABLE = 1
"""Exit code when PostgreSQL or Redis cannot be reached (or refuse the connection)."""


def unreachable_service(exc: BaseException) -> str | None:
    """One line for a connection that failed (wrong URL, server down, a database that does not
    exist, bad credentials), or None when ``exc`` is something else. Without a traceback: the
    message names the server and what it said."""
    import psycopg
    import redis

    if isinstance(exc, TransientError) and exc.__cause__ is not None:
        exc = exc.__cause__  # afterwrite's meaning of it (HistoryUnavailable): say what failed
    if isinstance(exc, psycopg.OperationalError) and "connection" in str(exc).lower():
        said = " ".join(str(exc).split())
        return f"cannot use PostgreSQL (AFTERWRITE_DATABASE_URL): {said}"
    if isinstance(exc, redis.ConnectionError | redis.AuthenticationError | redis.TimeoutError):
        return f"cannot use Redis (AFTERWRITE_REDIS_URL): {' '.join(str(exc).split())}"
    return None
