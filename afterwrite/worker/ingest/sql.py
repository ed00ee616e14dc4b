"""The SQL a drain runs for one kind, built once from the registry (never from input).

Identifiers are quoted with ``psycopg.sql.Identifier``; nothing here interpolates values.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql
from sqlalchemy import Column, Table
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.elements import TextClause

from afterwrite.core.settings import Settings
from afterwrite.models.base import derived_sql
from afterwrite.models.registry import InsertHook, kinds

_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class KindSql:
    create_staging: sql.Composed
    """A temporary staging table with the target's column types, emptied at every commit."""
    copy: sql.Composed
    """``COPY staging (columns) FROM STDIN`` (text format)."""
    insert: sql.Composed
    """Move staged rows into the target; rows whose key exists already are skipped."""
    clear_staging: sql.Composed


def _default_sql(column: Column[object]) -> sql.Composable | None:
    default = column.server_default
    if default is None:
        return None
    arg = getattr(default, "arg", None)
    if isinstance(arg, str):
        return sql.Literal(arg)
    if isinstance(arg, TextClause):
        return sql.SQL(arg.text)  # from the model's own source, not input
    if arg is not None:
        return sql.SQL(str(arg.compile(dialect=_DIALECT)))
    return None


def _insert_hook(table: Table) -> InsertHook | None:
    # Looked up here rather than passed in, so every caller (drain, import, bench) runs the
    # kind's own statement.
    return next((k.insert_sql for k in kinds if k.table is table), None)


def derived_columns(table: Table, settings: Settings) -> tuple[str, ...]:
    """The columns of ``table`` the insert computes under ``settings`` (see
    :func:`afterwrite.models.base.derived_sql`): those whose setting is true."""
    return tuple(
        c.name
        for c in table.columns
        if (d := derived_sql(c)) is not None and bool(getattr(settings, d[1]))
    )


def kind_sql(table: Table, columns: tuple[str, ...], *, derived: tuple[str, ...] = ()) -> KindSql:
    """The statements for ``table``. ``derived`` columns (:func:`derived_columns`) are
    computed by the insert from the staged row. When the table's kind has an ``insert_sql``
    hook, it rewrites the default insert, keeping its contract: rowcount = rows newly stored,
    and idempotent."""
    target = sql.Identifier(table.name)
    staging = sql.Identifier(f"_afterwrite_stage_{table.name}")
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    # Columns with a server default take it when the record left them out (sent as NULL).
    selected: list[sql.Composable] = []
    for name in columns:
        default = _default_sql(table.c[name])
        ident = sql.Identifier(name)
        if default is None:
            selected.append(ident)
        else:
            selected.append(sql.SQL("COALESCE({}, {})").format(ident, default))
    for name in derived:
        found = derived_sql(table.c[name])
        if found is None:
            raise ValueError(f"{table.name}.{name} is not a derived column")
        selected.append(sql.SQL(found[0]))  # from the model's own source, not input
    inserted = sql.SQL(", ").join(sql.Identifier(c) for c in (*columns, *derived))
    # Conflicts on the primary key: (id), or (id, created_at) for a table partitioned by time.
    key = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.primary_key.columns)
    insert = sql.SQL(
        "INSERT INTO {target} ({cols}) SELECT {selected} FROM {staging} "
        "ON CONFLICT ({key}) DO NOTHING"
    ).format(
        target=target,
        cols=inserted,
        selected=sql.SQL(", ").join(selected),
        staging=staging,
        key=key,
    )
    hook = _insert_hook(table)
    if hook is not None:
        insert = hook(insert)
    return KindSql(
        create_staging=sql.SQL(
            # CREATE TABLE AS copies column types but no NOT NULL constraints: a record may
            # leave out a column that has a server default, which the INSERT then applies.
            "CREATE TEMPORARY TABLE IF NOT EXISTS {staging} ON COMMIT DELETE ROWS "
            "AS SELECT {cols} FROM {target} WITH NO DATA"
        ).format(staging=staging, target=target, cols=cols),
        copy=sql.SQL("COPY {staging} ({cols}) FROM STDIN").format(staging=staging, cols=cols),
        insert=insert,
        clear_staging=sql.SQL("TRUNCATE {staging}").format(staging=staging),
    )
