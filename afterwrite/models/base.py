"""Declarative base shared by every record kind, with a naming convention so Alembic
revisions name constraints and indexes the same way the models do."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, MetaData, Table
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def writable_columns(table: Table) -> list[Column[Any]]:
    """The columns a record carries: every column but those PostgreSQL generates itself
    (``GENERATED ALWAYS AS … STORED``, such as ``query_history.search_vector``), which no
    client sends and no export or import moves."""
    return [c for c in table.columns if c.computed is None]
