"""``afterwrite export`` and ``afterwrite import``: a kind's rows as JSON Lines
(afterwrite.worker.operations.transfer).

Progress and summaries go to stderr for ``export`` (stdout may carry the rows) and the summary
to stdout for ``import``. Registered on the main group by afterwrite.cli.main.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from afterwrite.cli.common import (
    EXIT_SETUP,
    EXIT_UNAVAILABLE,
    cli_settings,
    fail,
    is_schema_error,
    unreachable_service,
)
from afterwrite.core.errors import SettingsError
from afterwrite.worker.operations.schema import SCHEMA_MISSING

if TYPE_CHECKING:
    from afterwrite.core.settings import Settings


class _RowRate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} rows/s", style="progress.data.speed")


def _progress(console: Console, *, bar: bool) -> Progress:
    columns: list[ProgressColumn | str] = [SpinnerColumn(), TextColumn("{task.description}")]
    if bar:  # import: how far through the file
        columns += [BarColumn(), DownloadColumn()]
    else:  # export: the total is unknown (counting first would cost a scan)
        columns += [TextColumn("{task.completed:,.0f} rows"), _RowRate()]
    columns += [TimeElapsedColumn()]
    # No redirection of sys.stdout: it may be carrying the export.
    return Progress(
        *columns, console=console, transient=False, redirect_stdout=False, redirect_stderr=False
    )


def _connect(settings: Settings, application_name: str, **kwargs: Any) -> Any:
    import psycopg

    try:
        return psycopg.connect(
            settings.require_database_url(),
            autocommit=True,
            application_name=application_name,
            connect_timeout=10,
            **kwargs,
        )
    except SettingsError as exc:
        fail(str(exc))
    except psycopg.OperationalError as exc:
        fail(unreachable_service(exc) or str(exc), EXIT_UNAVAILABLE)


def _time(value: str | None) -> datetime | None:
    from afterwrite.worker.operations.dead_letter_admin import parse_time

    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        fail(str(exc))


def _rate(n: int, seconds: float) -> str:
    return f"{seconds:.2f} s, {n / seconds:,.0f}/s" if seconds > 0 else f"{seconds:.2f} s"


@click.command("export")
@click.argument("kind")
@click.option("--since", help="Rows created at or after: ISO time or age (30m, 2h, 7d).")
@click.option("--until", help="Rows created before: ISO time or age.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write here (default: stdout). Written to FILE.partial, renamed when complete.",
)
def export_cmd(kind: str, since: str | None, until: str | None, output: Path | None) -> None:
    """Write KIND's rows as JSON Lines, ordered by id (one object per row, no header)."""
    import psycopg

    from afterwrite.models.registry import UnknownKindError, kinds
    from afterwrite.worker.operations.transfer import TransferError, export_rows

    settings = cli_settings()
    try:
        k = kinds.get(kind)
    except UnknownKindError as exc:
        fail(str(exc))
    lo, hi = _time(since), _time(until)
    started = time.monotonic()
    # No statement or idle timeouts here: a reader slower than the database (a pipe into
    # gzip, a slow disk) keeps the export's snapshot open on purpose.
    with ExitStack() as stack:
        conn = stack.enter_context(_connect(settings, "afterwrite-export"))
        out = stack.enter_context(_output(output))
        progress = stack.enter_context(_progress(Console(stderr=True), bar=False))
        task = progress.add_task(f"export {k.name}", total=None)
        try:
            rows = export_rows(conn, k, out, lo, hi, lambda n: progress.update(task, completed=n))
            out.flush()
        except BrokenPipeError:
            _quiet_exit_on_closed_stdout()
        except (TransferError, psycopg.Error, OSError) as exc:
            if is_schema_error(exc):
                fail(SCHEMA_MISSING, EXIT_SETUP)
            fail(str(exc).strip(), code=1)
    where = f" to {output}" if output is not None else ""
    elapsed_s = time.monotonic() - started
    click.echo(f"exported {rows:,} {k.name} rows{where} ({_rate(rows, elapsed_s)})", err=True)


@contextmanager
def _output(path: Path | None) -> Iterator[BinaryIO]:
    """stdout, or ``path`` written as ``path.partial`` (created private, never a file or link
    that was already there) and renamed only once complete: an interrupted or failed export
    never leaves a truncated file under the real name."""
    from afterwrite.worker.operations.transfer import TransferError, exclusive_output

    if path is None:
        yield sys.stdout.buffer
        return
    try:
        with exclusive_output(path) as f:
            yield f
    except TransferError as exc:
        fail(str(exc))


def _quiet_exit_on_closed_stdout() -> None:
    """`afterwrite export query | head`: the reader left, which is not an error of ours."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python's exit-time flush must not fail again
    sys.exit(1)


def _lines(f: BinaryIO, counter: list[int], max_bytes: int) -> Iterator[bytes]:
    from afterwrite.worker.operations.transfer import LongLine, read_lines

    for line in read_lines(f, max_bytes):
        counter[0] += line.length if isinstance(line, LongLine) else len(line)
        yield line


@click.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option("--kind", default="query", show_default=True, help="Record kind of every line.")
@click.option("--batch-size", default=5_000, show_default=True, help="Lines per commit.")
@click.option(
    "--no-guard",
    is_flag=True,
    help="Dead-letter even when the first batch is (nearly) all invalid.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def import_cmd(file: Path, kind: str, batch_size: int, no_guard: bool, as_json: bool) -> None:
    """Store the rows of a JSON Lines FILE ('-': stdin) as KIND, idempotently.

    Same path as the drain: validated rows are inserted (ids already stored are skipped),
    invalid lines are dead-lettered; one commit per batch, so it can be re-run after a failure.
    """
    import psycopg

    from afterwrite.models.registry import UnknownKindError, kinds
    from afterwrite.worker.ingest.sql import derived_columns
    from afterwrite.worker.operations.transfer import ImportReport, TransferError, import_rows

    settings = cli_settings()
    try:
        k = kinds.get(kind)
    except UnknownKindError as exc:
        fail(str(exc))
    if batch_size < 1:
        fail("--batch-size must be at least 1")
    err = Console(stderr=True)
    stdin = str(file) == "-"
    read = [0]
    started = time.monotonic()
    with ExitStack() as stack:
        try:
            f: BinaryIO = sys.stdin.buffer if stdin else stack.enter_context(file.open("rb"))
            size = None if stdin else os.fstat(f.fileno()).st_size
        except OSError as exc:
            fail(f"cannot read {file}: {exc.strerror}")
        conn = stack.enter_context(
            _connect(
                settings,
                "afterwrite-import",
                # As for the drain's batches: a stuck batch must not hold its locks forever.
                options=f"-c statement_timeout={int(settings.batch_timeout_s * 1000)}",
            )
        )
        progress = stack.enter_context(_progress(err, bar=size is not None))
        task = progress.add_task(f"import {k.name}", total=size)

        def advance(r: ImportReport) -> None:
            progress.update(task, completed=read[0], description=f"import {k.name}: {r.lines:,}")

        try:
            report = import_rows(
                conn,
                k,
                _lines(f, read, settings.import_max_line_bytes),
                batch_size,
                advance,
                source="stdin" if stdin else file.name,
                guard_ratio=None if no_guard else settings.dlq_guard_ratio,
                guard_min_lines=settings.dlq_guard_min_entries,
                max_line_bytes=settings.import_max_line_bytes,
                derived=derived_columns(k.table, settings),
            )
        except (TransferError, psycopg.Error, OSError) as exc:
            if is_schema_error(exc):
                fail(SCHEMA_MISSING, EXIT_SETUP)
            fail(str(exc).strip(), code=1)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    codes = ", ".join(f"{c} {n:,}" for c, n in sorted(report.codes.items()))
    click.echo(
        f"imported {report.lines:,} lines as {k.name}: {report.inserted:,} inserted, "
        f"{report.duplicates:,} duplicates, {report.dead_lettered:,} dead-lettered"
        f"{f' ({codes})' if codes else ''} ({_rate(report.lines, time.monotonic() - started)})"
    )
