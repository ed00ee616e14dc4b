"""``afterwrite history``: a user's records, one conversation, or full-text search
(afterwrite.History) as a table or JSON; ``history index-responses`` indexes the responses of
rows stored before ``AFTERWRITE_SEARCH_RESPONSES`` was turned on.

Read-only but for that one command. Registered on the main group by afterwrite.cli.main.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Group
from rich.table import Table
from rich.text import Text

from afterwrite.cli.common import (
    EXIT_SETUP,
    cli_settings,
    cli_time,
    console,
    db,
    fail,
    is_schema_error,
    printable_json,
    safe,
)

if TYPE_CHECKING:
    from afterwrite.history import History, Hit, StoredQuery

T = TypeVar("T")


def _read(read: Callable[[History], T]) -> T:
    """``read(history)`` with the configured database; a bad argument ends the command with
    its message (settings, schema and an unreachable database: as for every command, in
    :class:`afterwrite.cli.common.Group`)."""
    from afterwrite.history import History

    settings = cli_settings()
    try:
        with History.from_env(settings) as history:
            return read(history)
    except ValueError as exc:  # InvalidCursor and SettingsError included
        fail(str(exc))


NARROW = 120
"""Below this terminal width records print as short blocks, not a table: rich squeezes ten
columns into 80 by collapsing some to nothing. ``--json`` has every field."""


def _cells(r: StoredQuery) -> dict[str, str]:
    return {
        "created (UTC)": r.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
        "user": safe(r.user_id or "-"),
        "session": safe(r.session_id or "-"),
        "mode": safe(r.mode or "-"),
        "models": safe(", ".join(r.model_ids) or "-"),
        "query": safe(" ".join(r.query.split()) if r.query is not None else "(not stored)"),
        "response": safe(" ".join((r.response or "-").split())),
        "ms": "-" if r.response_time_ms is None else f"{r.response_time_ms:,.0f}",
        "id": r.id,
    }


def _table(
    title: str, records: list[StoredQuery], scores: list[float] | None = None
) -> Table | Group:
    if console.width < NARROW:
        return _blocks(title, records, scores)
    table = Table(title=safe(title))
    if scores is not None:
        table.add_column("score", justify="right")
    for name in ("created (UTC)", "user", "session", "mode", "models"):
        table.add_column(name, no_wrap=True)
    for name in ("query", "response"):
        table.add_column(name, max_width=48, overflow="ellipsis", no_wrap=True)
    table.add_column("ms", justify="right")
    table.add_column("id", no_wrap=True)
    for i, r in enumerate(records):
        score = [] if scores is None else [f"{scores[i]:.3f}"]
        table.add_row(*score, *_cells(r).values())
    return table


def _blocks(title: str, records: list[StoredQuery], scores: list[float] | None) -> Group:
    """Each record as a head line (time, user, id, score) and its query and response, each
    cut to one line of the terminal."""
    width = max(console.width - 4, 20)
    lines: list[Text] = [Text(safe(title), style="bold")]
    if not records:
        lines.append(Text("(no records)"))
    for i, r in enumerate(records):
        c = _cells(r)
        head = f"{c['created (UTC)']}  user {c['user']}  {c['id']}"
        if scores is not None:
            head = f"{scores[i]:.3f}  {head}"
        lines.append(Text(head, style="bold", overflow="ellipsis", no_wrap=True))
        for label in ("query", "response"):
            text = c[label] if len(c[label]) <= width - 4 else c[label][: width - 5] + "…"
            lines.append(Text(f"  {label[0].upper()}: {text}", no_wrap=True))
    return Group(*lines)


def _echo_json(report: dict[str, Any]) -> None:
    click.echo(printable_json(json.dumps(report, ensure_ascii=False, indent=2)))


@click.group("history", invoke_without_command=True)
@click.option("--user", "user_id", help="Only this user's records.")
@click.option("--session", "session_id", help="Only this session's (alone: in order).")
@click.option("--mode", help="Only records of this mode.")
@click.option("--model", help="Only requests this model answered.")
@click.option("--since", help="Created at or after: ISO time or age (30m, 2h, 7d).")
@click.option("--until", help="Created before: ISO time or age.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--cursor", help="Continue from a previous page's next cursor (same filters).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def history_cmd(
    ctx: click.Context,
    user_id: str | None,
    session_id: str | None,
    mode: str | None,
    model: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """Stored query records, newest first (one page; --cursor for the next).

    With --session and no other filter: that conversation, oldest first, in the order its
    records were made.
    """
    if ctx.invoked_subcommand is not None:
        return
    now = datetime.now(UTC)
    start = None if since is None else cli_time(since, now)
    end = None if until is None else cli_time(until, now)
    conversation = session_id is not None and not any((user_id, mode, model, since, until))
    if conversation:
        assert session_id is not None
        page = _read(lambda h: h.conversation(session_id, limit=limit, cursor=cursor))
        title = f"session {session_id}, in order"
    else:
        page = _read(
            lambda h: h.recent(
                user_id,
                session_id=session_id,
                mode=mode,
                model=model,
                since=start,
                until=end,
                limit=limit,
                cursor=cursor,
            )
        )
        filters = (("user", user_id), ("session", session_id), ("mode", mode), ("model", model))
        title = ", ".join(f"{k} {v}" for k, v in filters if v is not None) or "everyone"
        title += ", newest first"
    if as_json:
        _echo_json({"items": [r.as_dict() for r in page.items], "next_cursor": page.next_cursor})
        return
    console.print(_table(title, page.items))
    if page.next_cursor is not None:
        click.echo(f"more: --cursor {page.next_cursor}")


@history_cmd.command("search")
@click.argument("text")
@click.option("--user", "user_id", help="Only this user's records.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def history_search(text: str, user_id: str | None, limit: int, as_json: bool) -> None:
    """Full-text search over the stored queries (and responses, where
    AFTERWRITE_SEARCH_RESPONSES indexed them), best match first (web-search syntax: words,
    "a phrase", or, -word)."""
    hits: list[Hit] = _read(lambda h: h.search_text(text, user_id=user_id, limit=limit))
    if as_json:
        _echo_json({"hits": [{"score": h.score, **h.record.as_dict()} for h in hits]})
        return
    title = f"{text!r}" + ("" if user_id is None else f", user {user_id}")
    console.print(_table(title, [h.record for h in hits], [h.score for h in hits]))


@history_cmd.command("index-responses")
@click.option(
    "--batch",
    type=click.IntRange(1, 100_000),
    default=5000,
    show_default=True,
    help="Rows per transaction.",
)
def history_index_responses(batch: int) -> None:
    """Index the words of responses stored before AFTERWRITE_SEARCH_RESPONSES was on, so
    `history search` finds them. Safe beside running workers; run again after an
    interruption, it skips what is done."""
    import time

    import psycopg

    from afterwrite.models.registry import kinds
    from afterwrite.worker.ingest.sql import derived_columns
    from afterwrite.worker.operations.derived import FillReport, fill_derived

    settings = cli_settings()
    table = kinds.get("query").table
    if "response_search_vector" not in derived_columns(table, settings):
        click.echo(
            "afterwrite: note: AFTERWRITE_SEARCH_RESPONSES is off here; set it on the workers "
            "too, or responses stored from now on stay unindexed",
            err=True,
        )
    shown = [time.monotonic()]  # a line a second, after the first second

    def progress(r: FillReport) -> None:
        if time.monotonic() - shown[0] >= 1.0:
            shown[0] = time.monotonic()
            total = f" of ~{r.estimate:,}" if r.estimate > r.scanned else ""
            click.echo(f"walked {r.scanned:,}{total} rows, indexed {r.filled:,}", err=True)

    try:
        with db(settings) as conn:
            report = fill_derived(
                conn, table, "response_search_vector", batch=batch, progress=progress
            )
    except psycopg.Error as exc:
        if is_schema_error(exc):
            from afterwrite.core.errors import SCHEMA_MISSING

            fail(SCHEMA_MISSING, EXIT_SETUP)
        raise
    rows = "row" if report.filled == 1 else "rows"
    click.echo(f"indexed the responses of {report.filled:,} {rows} (walked {report.scanned:,})")
