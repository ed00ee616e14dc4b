"""``afterwrite stats``: usage per model, user, day or mode (afterwrite.worker.operations.usage) as
a table, JSON or an HTML chart.

Read-only. Registered on the main group by afterwrite.cli.main.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from afterwrite.cli.common import (
    EXIT_UNAVAILABLE,
    cli_settings,
    cli_time,
    fail,
    safe,
    unreachable_service,
)
from afterwrite.worker.operations.usage_rows import GROUP_BYS, GroupBy, UsageRow

_KEY_TITLES = {"model": "model", "user": "user", "day": "day (UTC)", "mode": "mode"}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _table(rows: list[UsageRow], group_by: str, title: str) -> Table:
    table = Table(title=safe(title))
    table.add_column(_KEY_TITLES[group_by])
    for col in ("calls", "avg ms", "p95 ms", "prompt tok", "completion tok", "total tok"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            "(none)" if r.key is None else safe(r.key),
            f"{r.calls:,}",
            _ms(r.avg_latency_ms),
            _ms(r.p95_latency_ms),
            f"{r.prompt_tokens:,}",
            f"{r.completion_tokens:,}",
            f"{r.total_tokens:,}",
        )
    return table


def _title(group_by: str, since: datetime, until: datetime, filters: dict[str, str]) -> str:
    span = f"{since.isoformat(timespec='seconds')} → {until.isoformat(timespec='seconds')}"
    where = "".join(f", {k} {v}" for k, v in filters.items())
    return f"usage per {group_by}, {span}{where}"


@click.command("stats")
@click.option(
    "--since",
    default="7d",
    show_default=True,
    help="Requests created at or after: ISO time or age (30m, 2h, 7d).",
)
@click.option("--until", help="Requests created before: ISO time or age (default: now).")
@click.option("--by", "group_by", type=click.Choice(GROUP_BYS), default="model", show_default=True)
@click.option("--user", "user_id", help="Only this user's requests.")
@click.option("--model", help="Only requests this model answered.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write a self-contained HTML page with a bar chart of calls and p95 latency.",
)
def stats_cmd(
    since: str,
    until: str | None,
    group_by: GroupBy,
    user_id: str | None,
    model: str | None,
    limit: int,
    as_json: bool,
    html_file: Path | None,
) -> None:
    """Calls, latency (avg, p95) and tokens per model, user, day or mode over a window.

    A request answered by several models counts once for each of them in --by model.
    """
    import psycopg

    from afterwrite.core.errors import SettingsError
    from afterwrite.worker.operations.usage import usage

    now = datetime.now(UTC)
    start = cli_time(since, now)
    end = now if until is None else cli_time(until, now)
    if start >= end:
        fail(f"empty window: --since {since} is not before --until {until or 'now'}")
    settings = cli_settings()
    try:
        conn = psycopg.connect(
            settings.require_database_url(),
            autocommit=True,
            application_name="afterwrite-stats",
            connect_timeout=10,
        )
    except SettingsError as exc:
        fail(str(exc))
    except psycopg.OperationalError as exc:
        fail(unreachable_service(exc) or str(exc), EXIT_UNAVAILABLE)
    with conn:
        rows = usage(
            conn,
            since=start,
            until=end,
            group_by=group_by,
            limit=limit,
            user_id=user_id,
            model=model,
        )
    filters = {k: v for k, v in (("user", user_id), ("model", model)) if v is not None}
    title = _title(group_by, start, end, filters)
    if html_file is not None:
        from afterwrite.worker.operations.usage_chart import html_page

        try:
            html_file.write_text(html_page(rows, title=title), encoding="utf-8")
        except OSError as exc:
            fail(f"cannot write {html_file}: {exc}")
    if as_json:
        report: dict[str, Any] = {
            "since": start.isoformat(),
            "until": end.isoformat(),
            "group_by": group_by,
            "user": user_id,
            "model": model,
            "rows": [r.as_dict() for r in rows],
        }
        click.echo(json.dumps(report, indent=2))
        return
    Console().print(_table(rows, group_by, title))
    if html_file is not None:
        click.echo(f"chart written to {html_file}")
