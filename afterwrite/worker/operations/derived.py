"""Filling a derived column (:func:`afterwrite.models.base.derived_sql`) for rows stored before
its setting was turned on, such as ``query_history.response_search_vector`` after
``AFTERWRITE_SEARCH_RESPONSES=true`` (``afterwrite history index-responses``).

Walks the table by primary key in batches, each its own short transaction, so the drain keeps
writing beside it and an interrupted run loses nothing: run it again and it skips the rows
already filled. Rows whose source is NULL (stored without bodies, or erased) stay NULL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import Table

from afterwrite.models.base import derived_sql


@dataclass
class FillReport:
    scanned: int = 0
    """Rows walked."""
    filled: int = 0
    """Rows whose column was computed now."""
    estimate: int = 0
    """Rows in the table when the walk began (PostgreSQL's estimate), for progress."""


def fill_derived(
    conn: psycopg.Connection[Any],
    table: Table,
    column: str,
    *,
    batch: int = 5000,
    progress: Callable[[FillReport], None] | None = None,
) -> FillReport:
    """Compute ``table.column`` wherever it is NULL and its expression is not, ``batch`` rows
    of the primary key order per committed transaction. ``conn`` must be in autocommit or
    idle; each batch commits. Raises ValueError for a column that is not derived or a table
    whose key is not one column."""
    found = derived_sql(table.c[column])
    if found is None:
        raise ValueError(f"{table.name}.{column} is not a derived column")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch!r}")
    (key,) = [c.name for c in table.primary_key.columns]
    names = {
        "t": sql.Identifier(table.name),
        "col": sql.Identifier(column),
        "key": sql.Identifier(key),
        "expr": sql.SQL(found[0]),  # from the model's own source, not input
    }
    first = sql.SQL("SELECT {key} FROM {t} ORDER BY {key} LIMIT %(batch)s")
    later = sql.SQL("SELECT {key} FROM {t} WHERE {key} > %(after)s ORDER BY {key} LIMIT %(batch)s")
    step = sql.SQL(
        "WITH b AS MATERIALIZED ({select}), "
        "u AS (UPDATE {t} SET {col} = {expr} FROM b WHERE {t}.{key} = b.{key} "
        "AND {t}.{col} IS NULL AND {expr} IS NOT NULL RETURNING 1) "
        "SELECT (SELECT count(*) FROM b), (SELECT count(*) FROM u), "
        "(SELECT {key} FROM b ORDER BY {key} DESC LIMIT 1)"
    )
    report = FillReport()
    row = conn.execute(
        "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = %s::regclass",
        (table.name,),
    ).fetchone()
    report.estimate = int(row[0]) if row else 0
    after: Any = None
    while True:
        select = (first if after is None else later).format(**names)
        with conn.transaction():
            res = conn.execute(
                step.format(select=select, **names), {"batch": batch, "after": after}
            ).fetchone()
        assert res is not None
        walked, filled, last = int(res[0]), int(res[1]), res[2]
        report.scanned += walked
        report.filled += filled
        if progress is not None:
            progress(report)
        if walked < batch:
            return report
        after = last
