"""Retention: delete rows older than a kind's retention, in bounded chunks.

Each chunk is its own short transaction (``DELETE … WHERE id IN (SELECT id … ORDER BY
created_at LIMIT n)``), using the ``created_at`` index, so a large backlog of expired rows never
holds locks for long and never competes with drains for minutes; a run stops after its time
budget and the next beat run continues. Deleting is idempotent: a crash mid-run loses nothing
that was meant to stay.

Dead letters are bounded the same way: a kind's dead letters not seen again for
``AFTERWRITE_DEAD_LETTER_RETENTION_DAYS`` (30), or for the kind's own retention when that is
shorter, are deleted in chunks on ``(kind, last_seen_at)``; so are those of kinds not
registered in this process (after the default). A poison record never outlives the rows its
kind keeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import psycopg
from psycopg import sql

from afterwrite.core.errors import ConfigurationError
from afterwrite.core.settings import Settings
from afterwrite.models.registry import Kind

log = logging.getLogger("afterwrite.retention")


class RetentionConfigError(ConfigurationError, ValueError):
    """Retention is configured for a kind whose table has no ``created_at`` column."""


def retention_days(kind: Kind, settings: Settings) -> int | None:
    """The kind's retention: ``AFTERWRITE_RETENTION_DAYS`` wins over the kind's default."""
    return settings.retention_days.get(kind.name, kind.retention_days)


def cutoff(now: datetime, days: int) -> datetime:
    """Rows created strictly before this are expired."""
    return now - timedelta(days=days)


@dataclass(frozen=True)
class RetentionReport:
    kind: str
    cutoff: datetime
    deleted: int
    chunks: int
    finished: bool
    """False when the time budget ran out before every expired row was deleted."""
    duration_s: float
    table: str = ""
    """The table purged: the kind's own, or ``dead_letters``."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "table": self.table,
            "cutoff": self.cutoff.isoformat(),
            "deleted": self.deleted,
            "chunks": self.chunks,
            "finished": self.finished,
            "duration_s": round(self.duration_s, 3),
        }


def purge_expired(
    conn: psycopg.Connection[Any],
    kind: Kind,
    cut: datetime,
    *,
    chunk_rows: int,
    budget_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> RetentionReport:
    """Delete ``kind``'s rows with ``created_at < cut``, ``chunk_rows`` per transaction, until
    none are left or ``budget_s`` is spent. ``conn`` must be in autocommit mode."""
    table = kind.table
    if "created_at" not in table.c:
        raise RetentionConfigError(
            f"kind {kind.name!r}: retention needs a created_at column on {table.name}"
        )
    statement = sql.SQL(
        "DELETE FROM {t} WHERE id IN "
        "(SELECT id FROM {t} WHERE created_at < %s ORDER BY created_at LIMIT %s)"
    ).format(t=sql.Identifier(table.name))
    started = clock()
    deleted = chunks = 0
    finished = False
    while clock() - started < budget_s:
        with conn.transaction():
            n = max(conn.execute(statement, (cut, chunk_rows)).rowcount, 0)
        deleted += n
        chunks += 1
        if n < chunk_rows:
            finished = True
            break
    report = RetentionReport(
        kind.name, cut, deleted, chunks, finished, clock() - started, table.name
    )
    if deleted:
        log.info(
            "retention kind=%s deleted=%d chunks=%d finished=%s",
            kind.name,
            deleted,
            chunks,
            finished,
            extra={"action": "retention", **report.as_dict()},
        )
    return report


def dead_letter_days(kind: Kind, settings: Settings) -> int:
    """How long ``kind``'s dead letters are kept: the dead-letter retention, or the kind's
    own when that is shorter."""
    own = retention_days(kind, settings)
    default = settings.dead_letter_retention_days
    return default if own is None else min(own, default)


DEAD_LETTERS = "dead_letters"


def purge_dead_letters(
    conn: psycopg.Connection[Any],
    kind: str,
    cut: datetime,
    *,
    chunk_rows: int,
    budget_s: float,
    other_than: list[str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> RetentionReport:
    """Delete ``kind``'s dead letters last seen before ``cut`` (or, with ``other_than``,
    those of every kind not in that list), ``chunk_rows`` per transaction, within
    ``budget_s``. ``conn`` must be in autocommit mode."""
    if other_than is None:
        match, param = sql.SQL("kind = %s"), cast(Any, kind)
    else:
        match, param = sql.SQL("kind <> ALL(%s)"), other_than
    statement = sql.SQL(
        "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE {match}"
        " AND last_seen_at < %s ORDER BY last_seen_at LIMIT %s)"
    ).format(match=match)
    started = clock()
    deleted = chunks = 0
    finished = False
    while clock() - started < budget_s:
        with conn.transaction():
            n = max(conn.execute(statement, (param, cut, chunk_rows)).rowcount, 0)
        deleted += n
        chunks += 1
        if n < chunk_rows:
            finished = True
            break
    report = RetentionReport(kind, cut, deleted, chunks, finished, clock() - started, DEAD_LETTERS)
    if deleted:
        log.info(
            "retention dead letters kind=%s deleted=%d chunks=%d finished=%s",
            kind,
            deleted,
            chunks,
            finished,
            extra={"action": "retention", **report.as_dict()},
        )
    return report


def run_retention(
    conn: psycopg.Connection[Any], kinds: list[Kind], settings: Settings
) -> list[RetentionReport]:
    """One retention pass: every kind that has a retention, then every kind's dead letters."""
    now = datetime.now(UTC)
    reports = []
    for kind in kinds:
        days = retention_days(kind, settings)
        if days is None:
            continue
        reports.append(
            purge_expired(
                conn,
                kind,
                cutoff(now, days),
                chunk_rows=settings.retention_chunk_rows,
                budget_s=settings.retention_budget_s,
            )
        )
    rows, budget = settings.retention_chunk_rows, settings.retention_budget_s
    for kind in kinds:
        cut = cutoff(now, dead_letter_days(kind, settings))
        reports.append(purge_dead_letters(conn, kind.name, cut, chunk_rows=rows, budget_s=budget))
    cut = cutoff(now, settings.dead_letter_retention_days)
    others = [k.name for k in kinds]
    reports.append(
        purge_dead_letters(conn, "*", cut, other_than=others, chunk_rows=rows, budget_s=budget)
    )
    return reports
