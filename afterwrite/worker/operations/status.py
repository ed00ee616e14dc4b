"""What ``afterwrite status`` reports: backlog per stream, rows per table, dead letters,
end-to-end freshness, the embedding stage and the published indexes.

Read-only; safe to run against production at any time. The readers here are shared with the
Prometheus collector (``afterwrite.worker.operations.exporter``) and the health checks
(``afterwrite.worker.operations.health``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

from afterwrite.core import wire
from afterwrite.core.settings import Settings
from afterwrite.models.embedding import EMBED_KIND
from afterwrite.models.registry import kinds
from afterwrite.worker import problems
from afterwrite.worker.index import owner
from afterwrite.worker.operations.freshness import Distribution, collect_freshness
from afterwrite.worker.problems import Problem

EXACT_COUNT_LIMIT = 1_000_000
"""Tables estimated above this many rows are reported from statistics, not ``count(*)``."""

EMBED_STATS_FIELDS = (
    "requests",
    "inputs",
    "tokens",
    "cache_hits",
    "unchanged",
    "embedded",
    "failed",
    "throttled",
    "truncated",
)
"""Cumulative counters the embedding stage keeps in the hash ``<prefix>:embed:stats``."""


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
class EmbeddingStatus:
    backlog: int
    """Jobs committed but not embedded yet (``embedding_jobs`` rows) plus the ``embed`` stream."""
    jobs_waiting: int
    stream_length: int
    counters: dict[str, int]
    """The stage's cumulative counters (requests, inputs, tokens, cache_hits, …)."""
    cache_hit_rate: float | None
    """(cache_hits + unchanged) / (cache_hits + unchanged + embedded); None before any."""


@dataclass(frozen=True)
class IndexStatus:
    collection: str
    version: int | str | None
    vector_count: int | None
    built_at: float | None
    """Epoch seconds of the served version's build (its manifest)."""
    age_s: float | None
    model: str | None
    index_type: str | None
    last_publish_age_s: float | None = None
    """Since the newest published build or delta (``index_builds``), when that table exists."""


@dataclass(frozen=True)
class Status:
    streams: list[StreamStatus]
    tables: list[TableStatus]
    dead_letters: dict[str, dict[str, int]]
    """kind → reason → count."""
    freshness: list[Distribution] = field(default_factory=list)
    embeddings: EmbeddingStatus | None = None
    indexes: list[IndexStatus] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    """Tasks stopped by a configuration error (afterwrite.worker.problems)."""
    index_dir: str = ""
    """The index directory, absolute (``AFTERWRITE_INDEX_DIR``, else ``<data dir>/indexes``)."""
    index_dir_problem: str | None = None
    """Why ``indexes`` is empty although the directory holds some: another database's."""

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


def dead_letter_breakdown(conn: psycopg.Connection[Any]) -> list[tuple[str, str, str, int]]:
    """(kind, reason, error code or "", count) for every group in ``dead_letters``."""
    if conn.execute("SELECT to_regclass('dead_letters')").fetchone() == (None,):
        return []
    return [
        (str(kind), str(reason), str(code or ""), int(n))
        for kind, reason, code, n in conn.execute(
            "SELECT kind, reason, error_code, count(*) FROM dead_letters "
            "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        )
    ]


def embed_stats_key(settings: Settings) -> str:
    return f"{settings.stream_prefix}:embed:stats"


def embed_counters(conn: redis.Redis, settings: Settings) -> dict[str, int]:
    raw = conn.hgetall(embed_stats_key(settings))
    out = dict.fromkeys(EMBED_STATS_FIELDS, 0)
    for name, value in raw.items():
        key = name.decode() if isinstance(name, bytes) else str(name)
        try:
            out[key] = int(value)
        except ValueError:
            continue  # not ours to judge; a counter is an integer
    return out


def cache_hit_rate(counters: dict[str, int]) -> float | None:
    """Of the texts that needed a vector, the share found in the cache. Documents re-sent
    unchanged needed none and are not counted (they made "50 %" show beside "cache_hits 0")."""
    hits = counters.get("cache_hits", 0)
    total = hits + counters.get("embedded", 0)
    return hits / total if total else None


def embedding_status(
    r: redis.Redis, conn: psycopg.Connection[Any] | None, settings: Settings
) -> EmbeddingStatus:
    """The embedding stage. ``conn`` None (PostgreSQL unreachable): jobs waiting count as 0."""
    stream_length = int(r.xlen(wire.stream_key(settings.stream_prefix, EMBED_KIND)))
    jobs = 0
    if conn is not None and EMBED_KIND in kinds:
        jobs = table_status(conn, EMBED_KIND, kinds.get(EMBED_KIND).table.name).rows
    counters = embed_counters(r, settings)
    return EmbeddingStatus(
        jobs + stream_length, jobs, stream_length, counters, cache_hit_rate(counters)
    )


def read_manifest(path: Path) -> dict[str, Any] | None:
    """A collection's manifest, or None when it is missing or unreadable (being replaced)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def index_status(
    settings: Settings, conn: psycopg.Connection[Any] | None, *, now: float | None = None
) -> list[IndexStatus]:
    """One entry per collection directory under ``settings.index_path`` with a manifest."""
    now = time.time() if now is None else now
    publishes: dict[str, float] = {}
    if conn is not None and conn.execute("SELECT to_regclass('index_builds')").fetchone() != (
        None,
    ):
        for collection, age in conn.execute(
            "SELECT collection, extract(epoch FROM now() - max(finished_at)) FROM index_builds "
            "WHERE status = 'published' AND finished_at IS NOT NULL GROUP BY collection"
        ):
            publishes[str(collection)] = max(0.0, float(age))
    out: list[IndexStatus] = []
    root = settings.index_path
    if conn is not None and owner.mismatch(settings, conn.info.dbname) is not None:
        return out  # another database's indexes (collect() says so)
    for manifest_path in sorted(root.glob("*/manifest.json")) if root.is_dir() else []:
        m = read_manifest(manifest_path)
        if m is None:
            continue
        collection = str(m.get("collection") or manifest_path.parent.name)
        built_at = _num(m.get("built_at"))
        version = m.get("version")
        count = _num(m.get("vector_count"))
        out.append(
            IndexStatus(
                collection=collection,
                version=version if isinstance(version, int | str) else None,
                vector_count=None if count is None else int(count),
                built_at=built_at,
                age_s=None if built_at is None else max(0.0, now - built_at),
                model=None if m.get("model") is None else str(m.get("model")),
                index_type=None if m.get("index_type") is None else str(m.get("index_type")),
                last_publish_age_s=publishes.get(collection),
            )
        )
    return out


def collect(settings: Settings) -> Status:
    r = redis.Redis.from_url(settings.require_redis_url(), socket_timeout=5)
    try:
        streams = [stream_status(r, settings, k.name) for k in kinds]
        stopped = problems.read(r, settings.stream_prefix)
        with psycopg.connect(settings.require_database_url(), autocommit=True) as conn:
            tables = [table_status(conn, k.name, k.table.name) for k in kinds]
            dead = dead_letter_counts(conn)
            freshness = collect_freshness(conn, list(kinds))
            embeddings = embedding_status(r, conn, settings) if EMBED_KIND in kinds else None
            indexes = index_status(settings, conn)
            foreign = owner.mismatch(settings, conn.info.dbname)
    finally:
        r.close()
    return Status(
        streams,
        tables,
        dead,
        freshness,
        embeddings,
        indexes,
        stopped,
        index_dir=str(settings.index_path),
        index_dir_problem=foreign,
    )
