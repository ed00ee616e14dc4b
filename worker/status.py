"""What ``afterwrite status`` reports: backlog per stream, rows per table, dead letters.

Read-only; safe to run against production at any time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
import redis
from psycopg import sql

from afterwrite import wire
from afterwrite.settings import Settings
from models.registry import kinds

EXACT_COUNT_LIMIT = 1_000_000
"""Tables estimated above this many rows are reported from statistics, not ``count(*)``."""


@dataclass(frozen=True)
class StreamStatus:
    kind: str
    stream: str
    length: int
    pending: int
    consumers: int
    oldest_age_s: float | None
    """Age of the oldest entry still in the stream (waiting or pending)."""


@dataclass(frozen=True)
class TableStatus:
    kind: str
    table: str
    rows: int
    estimated: bool


@dataclass(frozen=True)
class Status:
    streams: list[StreamStatus]
    tables: list[TableStatus]
    dead_letters: dict[str, dict[str, int]]
    """kind → reason → count."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stream_status(conn: redis.Redis, settings: Settings, kind: str) -> StreamStatus:
    key = wire.stream_key(settings.stream_prefix, kind)
    pipe = conn.pipeline(transaction=False)
    pipe.xlen(key)
    pipe.xrange(key, "-", "+", count=1)
    length, first = pipe.execute()
    pending = consumers = 0
    try:
        for group in conn.xinfo_groups(key):
            if group["name"].decode() == settings.consumer_group:
                pending = int(group["pending"])
                consumers = int(group["consumers"])
    except redis.ResponseError:  # no such stream yet
        pass
    oldest = None
    if first:
        oldest = max(0.0, time.time() - wire.entry_ms(first[0][0]) / 1000)
    return StreamStatus(kind, key, int(length), pending, consumers, oldest)


def table_status(conn: psycopg.Connection[Any], kind: str, table: str) -> TableStatus:
    estimate = conn.execute(
        "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)", (table,)
    ).fetchone()
    if estimate is None or estimate[0] is None:
        return TableStatus(kind, table, 0, estimated=False)  # not migrated yet
    if estimate[0] > EXACT_COUNT_LIMIT:
        return TableStatus(kind, table, int(estimate[0]), estimated=True)
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
    row = conn.execute(query).fetchone()
    return TableStatus(kind, table, int(row[0]) if row else 0, estimated=False)


def dead_letter_counts(conn: psycopg.Connection[Any]) -> dict[str, dict[str, int]]:
    if conn.execute("SELECT to_regclass('dead_letters')").fetchone() == (None,):
        return {}
    out: dict[str, dict[str, int]] = {}
    for kind, reason, n in conn.execute(
        "SELECT kind, coalesce(error_code, reason), count(*) FROM dead_letters "
        "GROUP BY 1, 2 ORDER BY 1, 2"
    ):
        out.setdefault(kind, {})[reason] = int(n)
    return out


def collect(settings: Settings) -> Status:
    r = redis.Redis.from_url(settings.require_redis_url(), socket_timeout=5)
    try:
        streams = [stream_status(r, settings, k.name) for k in kinds]
    finally:
        r.close()
    with psycopg.connect(settings.require_database_url(), autocommit=True) as conn:
        tables = [table_status(conn, k.name, k.table.name) for k in kinds]
        dead = dead_letter_counts(conn)
    return Status(streams, tables, dead)
