"""The registry of record kinds.

A kind is a name (``query``), the SQLAlchemy model whose table stores it, and its policies.
Streams, drains, validation, status and dead-lettering are all derived from the registry, so a
new kind plugs in with one decorator and an Alembic revision; the drain code never changes.
Kind names and table names only ever come from here, never from input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Table
from sqlalchemy.orm import DeclarativeBase

from afterwrite.core import kinds as kind_names
from afterwrite.core.kinds import UnknownKindError, import_kind_modules

if TYPE_CHECKING:
    from psycopg import sql

M = TypeVar("M", bound=type[DeclarativeBase])

__all__ = [
    "InsertHook",
    "Kind",
    "KindRegistry",
    "UnknownKindError",
    "Validator",
    "import_kind_modules",
    "kinds",
    "register_kind",
]


Validator = Callable[[dict[str, Any]], None]
"""A kind's own rule on a decoded payload; raise ValueError (optionally with a ``code``
attribute) to dead-letter the entry. Runs in the worker, after type checks."""

InsertHook = Callable[["sql.Composed"], "sql.Composed"]
"""A kind's own batch statement, built from the default one: it receives ``INSERT INTO t (…)
SELECT … FROM staging ON CONFLICT (pk) DO NOTHING`` and returns the statement a drain runs
instead (e.g. that insert in a CTE with ``RETURNING``, feeding rollups in the same statement).
Contract: the statement's rowcount is the number of rows it newly stored in the kind's table,
and it must stay idempotent (a redelivered batch changes nothing)."""


@dataclass(frozen=True)
class Kind:
    name: str
    model: type[DeclarativeBase]
    retention_days: int | None = None
    validate: Validator | None = None
    insert_sql: InsertHook | None = None
    """None: the default insert (see ``afterwrite.worker.ingest.sql.kind_sql``)."""
    validate_reads: tuple[str, ...] = ()
    """The scalar (not JSON) fields ``validate`` reads, if it declares them: the drain then
    runs it on those values of a typed row, so the kind keeps the fast path (a validator
    without them makes every record of the kind take the checked path)."""

    @property
    def table(self) -> Table:
        table = self.model.__table__
        assert isinstance(table, Table)
        return table


class KindRegistry:
    def __init__(self) -> None:
        self._kinds: dict[str, Kind] = {}

    def register(self, kind: Kind) -> None:
        kind_names.check_name(kind.name)
        existing = self._kinds.get(kind.name)
        if existing is not None and existing.model is not kind.model:
            raise ValueError(f"kind {kind.name!r} is already registered to {existing.model}")
        if "id" not in kind.table.c or not kind.table.c.id.primary_key:
            raise ValueError(f"kind {kind.name!r}: table {kind.table.name} needs primary key 'id'")
        self._kinds[kind.name] = kind
        kind_names.add(kind.name)

    def get(self, name: str) -> Kind:
        try:
            return self._kinds[name]
        except KeyError:
            raise UnknownKindError(name) from None

    def names(self) -> list[str]:
        return sorted(self._kinds)

    def __iter__(self) -> Iterator[Kind]:
        return iter(self._kinds[n] for n in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._kinds


kinds = KindRegistry()


def register_kind(
    name: str,
    *,
    retention_days: int | None = None,
    validate: Validator | None = None,
    insert_sql: InsertHook | None = None,
    validate_reads: tuple[str, ...] = (),
) -> Callable[[M], M]:
    """Class decorator: store records of kind ``name`` in this model's table.
    ``validate_reads``: see :attr:`Kind.validate_reads`."""

    def decorate(model: M) -> M:
        kinds.register(
            Kind(
                name=name,
                model=model,
                retention_days=retention_days,
                validate=validate,
                insert_sql=insert_sql,
                validate_reads=validate_reads,
            )
        )
        return model

    return decorate
