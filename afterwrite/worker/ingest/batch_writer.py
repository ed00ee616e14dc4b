"""Writing one batch of rows: COPY into staging, INSERT … ON CONFLICT (id) DO NOTHING, COMMIT.

Idempotent: a row whose id is already stored is skipped, so a redelivered batch changes
nothing. When PostgreSQL rejects the batch because of some row's content (a constraint, a value
out of range, …), the batch is bisected under savepoints: every good row is inserted and each
culprit is returned with its SQLSTATE, to be dead-lettered in the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from afterwrite.worker.errors import Failure, classify
from afterwrite.worker.ingest import dead_letters
from afterwrite.worker.ingest.sql import KindSql

Row = tuple[Any, ...]


@dataclass(frozen=True)
class Rejection:
    index: int
    """Position of the rejected row in the batch."""
    sqlstate: str
    message: str


@dataclass(frozen=True)
class WriteResult:
    inserted: int
    """Rows that were new; ``len(rows) - inserted - len(rejected)`` were already stored."""
    rejected: tuple[Rejection, ...]
    bisected: bool


def _stage_and_insert(cur: psycopg.Cursor[Any], q: KindSql, rows: Sequence[Row]) -> int:
    with cur.copy(q.copy) as copy:
        for row in rows:
            copy.write_row(row)
    cur.execute(q.insert)
    return max(cur.rowcount, 0)


def _is_rejection(exc: psycopg.Error) -> bool:
    return classify(exc) is Failure.POISON


def write_batch(
    conn: psycopg.Connection[Any],
    q: KindSql,
    rows: Sequence[Row],
    dead: Sequence[dead_letters.DeadEntry],
    reject: Callable[[Sequence[Rejection]], list[dead_letters.DeadEntry]],
) -> WriteResult:
    """Insert ``rows`` and store ``dead`` in one transaction, then COMMIT.

    ``reject(rejections) -> list[DeadEntry]`` turns rows PostgreSQL refused into dead letters.
    Raises for transient and configuration failures; nothing is committed then.
    """
    with conn.cursor() as cur:
        try:
            with conn.transaction():
                inserted = _stage_and_insert(cur, q, rows) if rows else 0
                dead_letters.add(conn, dead)
            return WriteResult(inserted, (), False)
        except psycopg.Error as exc:
            if not _is_rejection(exc):
                raise
        # Some row's content was refused: find the culprits, keep everything else.
        with conn.transaction():
            rejected: list[Rejection] = []
            inserted = _bisect(conn, cur, q, rows, 0, len(rows), rejected)
            extra = reject(rejected)
            dead_letters.add(conn, [*dead, *extra])
        return WriteResult(inserted, tuple(rejected), True)


def _bisect(
    conn: psycopg.Connection[Any],
    cur: psycopg.Cursor[Any],
    q: KindSql,
    rows: Sequence[Row],
    lo: int,
    hi: int,
    rejected: list[Rejection],
) -> int:
    if lo >= hi:
        return 0
    try:
        with conn.transaction():  # a savepoint inside the batch's transaction
            inserted = _stage_and_insert(cur, q, rows[lo:hi])
            cur.execute(q.clear_staging)
        return inserted
    except psycopg.Error as exc:
        if not _is_rejection(exc):
            raise
        if hi - lo == 1:
            rejected.append(Rejection(lo, exc.sqlstate or "", str(exc).strip()))
            return 0
    mid = (lo + hi) // 2
    return _bisect(conn, cur, q, rows, lo, mid, rejected) + _bisect(
        conn, cur, q, rows, mid, hi, rejected
    )
