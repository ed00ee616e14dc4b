"""``metric``: numeric measurements (latency, tokens, cost, scores), rolled up as they land.

Raw points go to ``metric_points`` (kept ``retention_days``, 7 by default; set
``AFTERWRITE_RETENTION_DAYS`` to change it). In the same statement that inserts a batch's points
the worker folds the points that were *newly* inserted into ``metric_rollups``: one row per
(name, tags, minute) with count, sum, min, max and a quantile sketch (``afterwrite.core.sketch``).

Why one statement (``WITH ins AS (INSERT … ON CONFLICT (id) DO NOTHING RETURNING …) INSERT
INTO metric_rollups … ON CONFLICT … DO UPDATE``): only points stored by this statement are
aggregated, so a batch redelivered after its commit adds nothing (exactly-once rollups on
at-least-once delivery), and the rollup commits or rolls back with its points. Concurrent
drains upserting the same bucket serialise on its row lock, and ``DO UPDATE`` re-reads the
committed row, so counts and sums are exact. Rollup rows are upserted in key order so that two
batches touching the same buckets wait for each other instead of deadlocking.

``created_at`` (the client's ``ts``) rather than ``ts`` as the column name: retention and
export key on ``created_at`` for every kind.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

from psycopg import sql
from sqlalchemy import BigInteger, DateTime, Double, Index, Integer, String, Uuid, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from afterwrite.core.errors import PoisonError
from afterwrite.core.sketch import LN_GAMMA, MIN_INDEXABLE
from afterwrite.models.base import Base
from afterwrite.models.registry import register_kind

BUCKET_S = 60
"""Width of a rollup bucket; buckets start at multiples of it since the Unix epoch."""
NAME_PATTERN = re.compile(r"[a-zA-Z_][a-zA-Z0-9_.:-]*")
"""Metric names and tag keys (Prometheus/StatsD-like), up to MAX_NAME_CHARS / MAX_TAG_KEY_CHARS."""
MAX_NAME_CHARS = 200
MAX_TAGS = 32
MAX_TAG_KEY_CHARS = 64
MAX_TAG_VALUE_CHARS = 200
MAX_TAGS_BYTES = 1024
"""UTF-8 bytes of all tag keys and values together: (name, tags, bucket) is a btree key, and an
index row must stay well under PostgreSQL's ~2.7 kB limit."""


class MetricError(PoisonError, ValueError):
    """A metric record that can never be stored (dead-lettered with ``code``)."""


def validate_metric(payload: dict[str, Any]) -> None:
    """The kind's validator (runs after the column checks): name charset, tags a flat map of
    at most MAX_TAGS string→string pairs. Raises MetricError ``bad_name`` / ``bad_tags``."""
    check_name(payload.get("name"))
    check_tags(payload.get("tags"))


def check_name(name: Any) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise MetricError("bad_name", f"metric name {name!r:.80} must match {NAME_PATTERN.pattern}")
    if len(name) > MAX_NAME_CHARS:
        raise MetricError("bad_name", f"metric name of {len(name)} chars, limit {MAX_NAME_CHARS}")


def check_tags(tags: Any) -> None:
    if tags is None:
        return
    if not isinstance(tags, dict):
        raise MetricError("bad_tags", f"tags must be a map of strings, got {type(tags).__name__}")
    if len(tags) > MAX_TAGS:
        raise MetricError("bad_tags", f"{len(tags)} tags, limit {MAX_TAGS}")
    size = 0
    for key, value in tags.items():
        if not isinstance(key, str) or not NAME_PATTERN.fullmatch(key):
            raise MetricError("bad_tags", f"tag key {key!r:.80} must match {NAME_PATTERN.pattern}")
        if len(key) > MAX_TAG_KEY_CHARS:
            raise MetricError("bad_tags", f"tag key {key[:40]!r}…: limit {MAX_TAG_KEY_CHARS}")
        if not isinstance(value, str):
            raise MetricError("bad_tags", f"tag {key!r}: value must be a string")
        if len(value) > MAX_TAG_VALUE_CHARS:
            raise MetricError("bad_tags", f"tag {key!r}: value over {MAX_TAG_VALUE_CHARS} chars")
        size += len(key) + len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_TAGS_BYTES:
        raise MetricError("bad_tags", f"tags of {size} bytes, limit {MAX_TAGS_BYTES}")


# {points_insert} is the kind's default insert (see afterwrite.worker.ingest.sql.kind_sql). The
# bucket key expression must stay the one in afterwrite.core.sketch.bucket_key, constants rendered
# from there. The final ``SELECT FROM ins`` returns one empty row per inserted point: its rowcount
# is the "rows newly stored" the InsertHook contract asks for, at a few bytes per point.
_ROLLUP = """\
WITH ins AS (
  {points_insert} RETURNING created_at, name, tags, value
), keyed AS (
  SELECT name, tags, value,
         date_bin({stride}::interval, created_at, TIMESTAMPTZ 'epoch') AS bucket_start,
         CASE WHEN value >= {min_ix}::float8 THEN 'p'
              WHEN value <= -{min_ix}::float8 THEN 'n' ELSE 'z' END AS side,
         CASE WHEN abs(value) >= {min_ix}::float8
              THEN ceil(ln(abs(value)) / {ln_gamma}::float8)::integer END AS k
  FROM ins
), cells AS (
  SELECT name, tags, bucket_start, side, k, count(*) AS c,
         sum(value) AS s, min(value) AS lo, max(value) AS hi
  FROM keyed GROUP BY name, tags, bucket_start, side, k
), groups AS (
  SELECT name, tags, bucket_start, sum(c)::bigint AS n, sum(s) AS s, min(lo) AS lo,
         max(hi) AS hi,
         jsonb_build_object(
           'p', coalesce(jsonb_object_agg(k, c) FILTER (WHERE side = 'p'), '{{}}'::jsonb),
           'n', coalesce(jsonb_object_agg(k, c) FILTER (WHERE side = 'n'), '{{}}'::jsonb),
           'z', coalesce(sum(c) FILTER (WHERE side = 'z'), 0)) AS sketch
  FROM cells GROUP BY name, tags, bucket_start
), rolled AS (
  INSERT INTO metric_rollups AS r
    (name, bucket_s, bucket_start, tags, count, sum, min, max, sketch)
  SELECT name, {bucket_s}, bucket_start, tags, n, s, lo, hi, sketch FROM groups
  ORDER BY name, bucket_start, tags
  ON CONFLICT (name, bucket_s, bucket_start, tags) DO UPDATE SET
    count = r.count + EXCLUDED.count,
    sum = r.sum + EXCLUDED.sum,
    min = LEAST(r.min, EXCLUDED.min),
    max = GREATEST(r.max, EXCLUDED.max),
    sketch = afterwrite_sketch_merge(r.sketch, EXCLUDED.sketch)
)
SELECT FROM ins"""


def rollup_insert(points_insert: sql.Composed) -> sql.Composed:
    """The metric kind's ``insert_sql`` hook: insert the points, roll up the new ones."""
    return sql.SQL(_ROLLUP).format(
        points_insert=points_insert,
        stride=sql.Literal(f"{BUCKET_S} seconds"),
        min_ix=sql.Literal(MIN_INDEXABLE),
        ln_gamma=sql.Literal(LN_GAMMA),
        bucket_s=sql.Literal(BUCKET_S),
    )


@register_kind("metric", retention_days=7, validate=validate_metric, insert_sql=rollup_insert)
class MetricPoint(Base):
    """One recorded measurement. ``id`` is the client's UUIDv7 event id."""

    __tablename__ = "metric_points"
    __table_args__ = (
        Index("ix_metric_points_created_at", "created_at"),
        Index("ix_metric_points_name_created_at", "name", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), info={"not_future": True})
    """When the measurement was taken (client clock; ``ts`` of ``record_metric``)."""
    name: Mapped[str] = mapped_column(String(MAX_NAME_CHARS))
    tags: Mapped[dict[str, str]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    value: Mapped[float] = mapped_column(Double)
    ingested_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class MetricRollup(Base):
    """Aggregates of the points of one series (name + exact tag set) in one time bucket.

    Written only by the metric kind's insert statement; read with
    ``afterwrite.worker.operations.metric_rollups.summary``. The primary key leads with (name,
    bucket_s, bucket_start) so a window of one metric is one index range scan.
    """

    __tablename__ = "metric_rollups"

    name: Mapped[str] = mapped_column(String(MAX_NAME_CHARS), primary_key=True)
    bucket_s: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    tags: Mapped[dict[str, str]] = mapped_column(JSONB, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    sum: Mapped[float] = mapped_column(Double)
    min: Mapped[float] = mapped_column(Double)
    max: Mapped[float] = mapped_column(Double)
    sketch: Mapped[dict[str, Any]] = mapped_column(JSONB)
    """``afterwrite.core.sketch.Sketch`` JSON form, merged by ``afterwrite_sketch_merge``."""
