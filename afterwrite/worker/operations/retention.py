"""Retention: delete rows older than a kind's retention, in bounded chunks.

Each chunk is its own short transaction (``DELETE … WHERE id IN (SELECT id … ORDER BY
created_at LIMIT n)``), using the ``created_at`` index, so a large backlog of expired rows never
holds locks for long and never competes with drains for minutes; a run stops after its time
budget and the next beat run continues. Deleting is idempotent: a crash mid-run loses nothing
that was meant to stay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

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

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
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
    report = RetentionReport(kind.name, cut, deleted, chunks, finished, clock() - started)
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


def run_retention(
    conn: psycopg.Connection[Any], kinds: list[Kind], settings: Settings
) -> list[RetentionReport]:
    """One retention pass over every kind that has a retention."""
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
    return reports
