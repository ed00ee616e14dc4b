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
    first = sql.SQL("SELECT {key} FROM {t} ORDER BY {key} LIMIT %(batch)s").format(**names)
    later = sql.SQL(
        "SELECT {key} FROM {t} WHERE {key} > %(after)s ORDER BY {key} LIMIT %(batch)s"
    ).format(**names)
    # Bound by the batch's keys, so it is an index scan whatever the statistics say (a join to
    # the batch instead let a never-analysed table be scanned whole, per batch). The expression
    # is evaluated twice for a row it fills: cheaper than any join PostgreSQL would pick here.
    update = sql.SQL(
        "UPDATE {t} SET {col} = {expr} "
        "WHERE {key} = ANY(%(keys)s) AND {col} IS NULL AND {expr} IS NOT NULL"
    ).format(**names)
    report = FillReport()
    row = conn.execute(
        "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = %s::regclass",
        (table.name,),
    ).fetchone()
    report.estimate = int(row[0]) if row else 0
    after: Any = None
    while True:
        with conn.transaction():
            walk = first if after is None else later
            keys = [r[0] for r in conn.execute(walk, {"after": after, "batch": batch})]
            filled = conn.execute(update, {"keys": keys}).rowcount if keys else 0
        report.scanned += len(keys)
        report.filled += max(filled, 0)
        if progress is not None:
            progress(report)
        if len(keys) < batch:
            return report
        after = keys[-1]
