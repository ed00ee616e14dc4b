"""Whether the database has afterwrite's schema: the tables of every registered kind, the
shared ones and Alembic's version table. Used by ``health`` and by every CLI command."""

from __future__ import annotations

from typing import Any

from afterwrite.core.errors import SCHEMA_MISSING

__all__ = ["SCHEMA_MISSING", "missing_tables"]


def missing_tables(conn: Any) -> list[str]:
    """The tables afterwrite and the registered kinds need (and Alembic's version table) that
    the database behind ``conn`` (psycopg) lacks."""
    from afterwrite.models import Base, kinds

    names = sorted({"alembic_version", *Base.metadata.tables, *(k.table.fullname for k in kinds)})
    rows = conn.execute(
        "SELECT n FROM unnest(%s::text[]) AS n WHERE to_regclass(n) IS NULL ORDER BY n", (names,)
    ).fetchall()
    return [str(r[0]) for r in rows]
