"""End-to-end freshness: how long an entry takes from enqueue to committed, embedded, searchable.

Three stages, each a distribution (p50, p90, p99, max) over a recent window (default one hour):

- ``enqueue_to_committed`` per kind: the drain's commit time (``ingested_at``) minus the enqueue
  time. The enqueue time is the timestamp inside the entry's UUIDv7 ``id``, set by the producer
  when ``record_*`` was called (``created_at`` may be a caller-supplied event time, e.g. a
  backfill, and would not measure the pipeline). Kinds without ``ingested_at`` or without a
  UUID id have no figure. Embedding jobs are deleted once embedded, so the ``embed`` kind is
  measured on ``embeddings`` (``committed_at - enqueued_at``) plus the jobs still waiting.
- ``committed_to_embedded`` per collection: ``embeddings.embedded_at - committed_at``.
- ``embedded_to_searchable`` per collection: a row is searchable from the ``finished_at`` of the
  first published build or delta (``index_builds``) whose ``max_seq`` covers its ``seq``. Rows
  embedded in the window that no published build covers yet are counted as ``waiting``, with
  the age of the oldest.

Cost: each figure reads at most ``sample_rows`` rows per kind or collection, the newest ones,
through an index (the primary key for kinds: UUIDv7 ids sort by time; ``(collection, seq)`` for
embeddings), so it is cheap enough to compute at every Prometheus scrape. Read-only; run it on
a connection with a statement timeout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import Table, Uuid

from afterwrite.models.embedding import EMBED_KIND
from afterwrite.models.registry import Kind

STAGES = ("enqueue_to_committed", "committed_to_embedded", "embedded_to_searchable")
QUANTILES = (0.5, 0.9, 0.99)
DEFAULT_WINDOW_S = 3600.0
DEFAULT_SAMPLE_ROWS = 10_000

# The millisecond timestamp in the first 48 bits of a UUIDv7.
_UUID7_MS = sql.SQL(
    "('x' || lpad(substr(replace({col}::text, '-', ''), 1, 12), 16, '0'))::bit(64)::bigint"
)
_IS_UUID7 = sql.SQL("substr({col}::text, 15, 1) = '7'")

_SUMMARY = """
    count(lag_s),
    percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY lag_s),
    max(lag_s)
"""


@dataclass(frozen=True)
class Distribution:
    stage: str
    scope: str
    """The kind (enqueue_to_committed) or the collection (the embedding stages)."""
    samples: int
    p50_s: float | None
    p90_s: float | None
    p99_s: float | None
    max_s: float | None
    waiting: int = 0
    """embedded_to_searchable: rows embedded in the window that no published index covers."""
    oldest_waiting_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def quantiles(self) -> dict[float, float | None]:
        return {0.5: self.p50_s, 0.9: self.p90_s, 0.99: self.p99_s}


def _distribution(
    stage: str, scope: str, row: Any, waiting: int = 0, oldest: Any = None
) -> Distribution:
    n, qs, top = (row[0], row[1], row[2]) if row is not None else (0, None, None)
    p50, p90, p99 = (float(q) for q in qs) if qs else (None, None, None)
    return Distribution(
        stage,
        scope,
        int(n or 0),
        p50,
        p90,
        p99,
        None if top is None else float(top),
        waiting,
        None if oldest is None else float(oldest),
    )


def measurable(table: Table) -> bool:
    """A kind's table carries what ``enqueue_to_committed`` needs: a UUID id and ingested_at."""
    return "ingested_at" in table.c and isinstance(table.c.id.type, Uuid)


def _exists(conn: psycopg.Connection[Any], table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    return bool(row and row[0])


def commit_lag(
    conn: psycopg.Connection[Any],
    kind: Kind,
    *,
    window_s: float = DEFAULT_WINDOW_S,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
) -> Distribution | None:
    """``enqueue_to_committed`` for one kind, or None when its table cannot tell."""
    if not measurable(kind.table) or not _exists(conn, kind.table.name):
        return None
    if kind.name == EMBED_KIND and _exists(conn, "embeddings"):
        return _embed_commit_lag(conn, window_s, sample_rows)
    ms = _UUID7_MS.format(col=sql.Identifier("id"))
    query = sql.SQL(
        "SELECT " + _SUMMARY + " FROM ("
        "  SELECT greatest(0, extract(epoch FROM ingested_at) - ms / 1000.0)::float8 AS lag_s"
        "  FROM (SELECT ingested_at, {ms} AS ms FROM {table} WHERE {v7}"
        "        ORDER BY id DESC LIMIT %(n)s) newest"
        "  WHERE ingested_at >= now() - make_interval(secs => %(w)s)"
        ") d"
    ).format(ms=ms, table=sql.Identifier(kind.table.name), v7=_IS_UUID7.format(col=sql.SQL("id")))
    row = conn.execute(query, {"n": sample_rows, "w": window_s}).fetchone()
    return _distribution(STAGES[0], kind.name, row)


# Newest ``n`` embeddings rows of every collection: a skip scan over (collection, seq) to list
# the collections, then the index's newest entries of each.
_RECENT_EMBEDDINGS = """
WITH RECURSIVE cols(collection) AS (
    (SELECT collection FROM embeddings ORDER BY collection LIMIT 1)
    UNION ALL
    SELECT (SELECT e.collection FROM embeddings e WHERE e.collection > c.collection
            ORDER BY e.collection LIMIT 1)
    FROM cols c WHERE c.collection IS NOT NULL
), recent AS (
    SELECT r.* FROM cols c CROSS JOIN LATERAL (
        SELECT e.collection, e.seq, e.enqueued_at, e.committed_at, e.embedded_at
        FROM embeddings e WHERE e.collection = c.collection
        ORDER BY e.seq DESC LIMIT %(n)s
    ) r
    WHERE c.collection IS NOT NULL
)
"""


def _embed_commit_lag(
    conn: psycopg.Connection[Any], window_s: float, sample_rows: int
) -> Distribution:
    ms = _UUID7_MS.format(col=sql.Identifier("id"))
    query = sql.SQL(
        _RECENT_EMBEDDINGS + ", lags AS ("
        "  SELECT extract(epoch FROM committed_at - enqueued_at) AS lag_s FROM recent"
        "  WHERE committed_at >= now() - make_interval(secs => %(w)s)"
        "  UNION ALL"
        "  SELECT extract(epoch FROM ingested_at) - ms / 1000.0 FROM ("
        "    SELECT ingested_at, {ms} AS ms FROM embedding_jobs WHERE {v7}"
        "    ORDER BY ingested_at DESC LIMIT %(n)s) j"
        "  WHERE ingested_at >= now() - make_interval(secs => %(w)s)"
        ") SELECT " + _SUMMARY.replace("lag_s", "greatest(0, lag_s)::float8") + " FROM lags"
    ).format(ms=ms, v7=_IS_UUID7.format(col=sql.SQL("id")))
    row = conn.execute(query, {"n": sample_rows, "w": window_s}).fetchone()
    return _distribution(STAGES[0], EMBED_KIND, row)


def embed_lag(
    conn: psycopg.Connection[Any],
    *,
    window_s: float = DEFAULT_WINDOW_S,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
) -> list[Distribution]:
    """``committed_to_embedded`` per collection (empty without an ``embeddings`` table)."""
    if not _exists(conn, "embeddings"):
        return []
    rows = conn.execute(
        _RECENT_EMBEDDINGS
        + "SELECT collection, "
        + _SUMMARY.replace("lag_s", "greatest(0, extract(epoch FROM embedded_at - committed_at))")
        + " FROM recent WHERE embedded_at >= now() - make_interval(secs => %(w)s)"
        " GROUP BY collection ORDER BY collection",
        {"n": sample_rows, "w": window_s},
    ).fetchall()
    return [_distribution(STAGES[1], r[0], r[1:]) for r in rows]


def search_lag(
    conn: psycopg.Connection[Any],
    *,
    window_s: float = DEFAULT_WINDOW_S,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
) -> list[Distribution]:
    """``embedded_to_searchable`` per collection (empty without ``embeddings``/``index_builds``).

    Tombstones count too: a delete is "searchable" once an index no longer returns the row.
    """
    if not (_exists(conn, "embeddings") and _exists(conn, "index_builds")):
        return []
    rows = conn.execute(
        _RECENT_EMBEDDINGS
        + """, covered AS (
            SELECT r.collection, r.embedded_at,
                   (SELECT min(b.finished_at) FROM index_builds b
                    WHERE b.collection = r.collection AND b.status = 'published'
                      AND b.max_seq >= r.seq AND b.finished_at IS NOT NULL) AS searchable_at
            FROM recent r WHERE r.embedded_at >= now() - make_interval(secs => %(w)s)
        )
        SELECT collection,
            count(searchable_at),
            percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (
                ORDER BY greatest(0, extract(epoch FROM searchable_at - embedded_at))::float8)
                FILTER (WHERE searchable_at IS NOT NULL),
            max(greatest(0, extract(epoch FROM searchable_at - embedded_at))::float8),
            count(*) FILTER (WHERE searchable_at IS NULL),
            extract(epoch FROM now() - min(embedded_at) FILTER (WHERE searchable_at IS NULL))
        FROM covered GROUP BY collection ORDER BY collection""",
        {"n": sample_rows, "w": window_s},
    ).fetchall()
    return [_distribution(STAGES[2], r[0], r[1:4], waiting=int(r[4]), oldest=r[5]) for r in rows]


def collect_freshness(
    conn: psycopg.Connection[Any],
    kinds: list[Kind],
    *,
    window_s: float = DEFAULT_WINDOW_S,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
) -> list[Distribution]:
    """Every stage's distributions, kinds first, then collections (see the module doc)."""
    out: list[Distribution] = []
    for kind in kinds:
        d = commit_lag(conn, kind, window_s=window_s, sample_rows=sample_rows)
        if d is not None:
            out.append(d)
    out += embed_lag(conn, window_s=window_s, sample_rows=sample_rows)
    out += search_lag(conn, window_s=window_s, sample_rows=sample_rows)
    return out
