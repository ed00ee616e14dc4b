"""Usage statistics over ``query_history``: calls, latency and tokens per model, user, day or mode.

Read-only, one ``SELECT`` per call, safe against production at any time. Everything is
aggregated in PostgreSQL; only the (at most ``limit``) result rows reach Python.

Contract of :func:`usage`:

- **Window**: ``since <= created_at < until`` (inclusive start, exclusive end), so consecutive
  windows never count a request twice. ``created_at`` is the client's clock.
- **Per model**: each element of ``model_ids`` is a group of its own, so a request answered by
  two models (``mode = 'compare'``) counts once for *each* of them, with its full latency and
  tokens. Summed over models, calls and tokens can therefore exceed the totals of the window.
  Requests with an empty ``model_ids`` do not appear in the per-model view.
- **Per day**: calendar days in UTC, keyed ``YYYY-MM-DD``; the ``limit`` most recent days,
  oldest first. Other groupings: most calls first, ties by key.
- **Latency**: ``avg`` and continuous 95th percentile (``percentile_cont(0.95)``, linear
  interpolation, as ``statistics.quantiles(method="inclusive")``) of ``response_time_ms``,
  ignoring requests without one; ``None`` when no request in the group has one.
- **Tokens**: sums with missing counts taken as 0; ``total = prompt + completion``.
- **Filters**: ``user_id`` (equality; served by ``(user_id, created_at)``) and ``model``
  (containment ``model_ids @> '["model"]'``; served by the GIN index). Grouped by model with a
  ``model`` filter, only that model's row is returned, not the models it was compared with.

SQL is assembled from fixed fragments chosen by a dictionary lookup on ``group_by``; every value
travels as a bound parameter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from afterwrite.worker.operations.usage_rows import GROUP_BYS, GroupBy, UsageRow

P95 = 0.95


@dataclass(frozen=True)
class _Grouping:
    source: sql.Composable
    """The FROM clause: the table, or the table with one row per model id."""
    key: sql.Composable
    order: sql.Composable
    """Which ``limit`` groups to keep."""


_TABLE = sql.SQL("query_history AS q")
_GROUPINGS: dict[str, _Grouping] = {
    "model": _Grouping(
        sql.SQL(
            "query_history AS q CROSS JOIN LATERAL jsonb_array_elements_text(q.model_ids) AS m"
        ),
        sql.SQL("m.value"),
        sql.SQL("calls DESC, key"),
    ),
    "user": _Grouping(_TABLE, sql.SQL("q.user_id"), sql.SQL("calls DESC, key")),
    "mode": _Grouping(_TABLE, sql.SQL("q.mode"), sql.SQL("calls DESC, key")),
    "day": _Grouping(
        _TABLE,
        # to_char of a UTC timestamp: sorts like the date it spells
        sql.SQL("to_char(q.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')"),
        sql.SQL("key DESC"),
    ),
}

_SELECT = """
SELECT {key} AS key,
       count(*) AS calls,
       avg(q.response_time_ms) AS avg_latency_ms,
       percentile_cont({p95}) WITHIN GROUP (ORDER BY q.response_time_ms) AS p95_latency_ms,
       coalesce(sum(q.prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(q.completion_tokens), 0) AS completion_tokens
FROM {source}
WHERE {where}
GROUP BY 1
ORDER BY {order}
LIMIT %(limit)s
"""


def usage_query(
    group_by: GroupBy, *, user_id: str | None = None, model: str | None = None
) -> sql.Composed:
    """The statement :func:`usage` runs (parameters: since, until, limit, user_id, model_json,
    model). Exposed for ``EXPLAIN``. ``ValueError`` for an unknown ``group_by``."""
    grouping = _GROUPINGS.get(group_by)
    if grouping is None:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BYS)}, not {group_by!r}")
    clauses = [sql.SQL("q.created_at >= %(since)s"), sql.SQL("q.created_at < %(until)s")]
    if user_id is not None:
        clauses.append(sql.SQL("q.user_id = %(user_id)s"))
    if model is not None:
        clauses.append(sql.SQL("q.model_ids @> %(model_json)s::jsonb"))
        if group_by == "model":
            clauses.append(sql.SQL("m.value = %(model)s"))
    return sql.SQL(_SELECT).format(
        key=grouping.key,
        p95=sql.Literal(P95),
        source=grouping.source,
        where=sql.SQL(" AND ").join(clauses),
        order=grouping.order,
    )


def usage_params(
    *,
    since: datetime,
    until: datetime,
    limit: int,
    user_id: str | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """The bound parameters for :func:`usage_query`."""
    return {
        "since": since,
        "until": until,
        "limit": limit,
        "user_id": user_id,
        "model": model,
        "model_json": None if model is None else json.dumps([model]),
    }


def usage(
    conn: psycopg.Connection[Any],
    *,
    since: datetime,
    until: datetime,
    group_by: GroupBy,
    limit: int = 20,
    user_id: str | None = None,
    model: str | None = None,
) -> list[UsageRow]:
    """Calls, latency and tokens per ``group_by`` over ``[since, until)`` (see the module
    docstring for the exact semantics). At most ``limit`` rows.

    Runs one read-only ``SELECT`` on ``conn``; commits nothing. ``since``/``until`` must be
    timezone-aware; ``ValueError`` for naive times, ``limit < 1`` or an unknown ``group_by``.
    """
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("since and until must be timezone-aware")
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    query = usage_query(group_by, user_id=user_id, model=model)
    params = usage_params(since=since, until=until, limit=limit, user_id=user_id, model=model)
    with conn.cursor() as cur:
        cur.execute(query, params)
        records = cur.fetchall()
    rows = [
        UsageRow(
            key=key,
            calls=int(calls),
            avg_latency_ms=None if avg is None else float(avg),
            p95_latency_ms=None if p95 is None else float(p95),
            prompt_tokens=int(prompt),
            completion_tokens=int(completion),
            total_tokens=int(prompt) + int(completion),
        )
        for key, calls, avg, p95, prompt, completion in records
    ]
    if group_by == "day":
        rows.reverse()  # fetched newest first so that ``limit`` keeps the latest days
    return rows
