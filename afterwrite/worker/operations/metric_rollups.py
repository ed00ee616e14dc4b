"""Reading metric rollups back: count, sum, avg, min, max and quantiles over any window.

Reads ``metric_rollups`` only (never the raw points, which may have expired): one index range
scan on (name, bucket_s, bucket_start), then the bucket sketches are merged here. Merging is
exact, so a quantile over a window of any length keeps the sketch's bound: within
``afterwrite.core.sketch.ALPHA`` relative error of the value at rank ``floor(q * (count - 1))``.
Read-only; runs in whatever transaction ``conn`` is in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from afterwrite.core.sketch import Sketch
from afterwrite.models.metric import BUCKET_S

DEFAULT_QUANTILES = (0.5, 0.95, 0.99)


@dataclass
class _Group:
    count: int = 0
    total: float = 0.0
    lo: float | None = None
    hi: float | None = None
    sketch: Sketch = field(default_factory=Sketch)

    def add(self, count: int, total: float, lo: float, hi: float, sketch: Sketch) -> None:
        self.count += count
        self.total += total
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)
        self.sketch.merge(sketch)


def _label(q: float) -> str:
    """0.5 → ``p50``, 0.95 → ``p95``, 0.999 → ``p99.9``."""
    return f"p{q * 100:g}"


def summary(
    conn: psycopg.Connection[Any],
    name: str,
    *,
    since: datetime,
    until: datetime,
    tags: Mapping[str, str] | None = None,
    group_by: Sequence[str] | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    bucket_s: int = BUCKET_S,
) -> list[dict[str, Any]]:
    """Aggregates of metric ``name`` over the buckets with ``since <= bucket_start < until``.

    The window is made of whole buckets (``bucket_s``, a minute): pass bucket-aligned bounds
    for an exact window; a bucket is in or out as a whole. ``tags`` keeps the series carrying
    at least those tags (jsonb containment). ``group_by`` names tag keys to split by: one
    result per distinct combination of their values (a missing tag groups as None); without
    it, one result for everything matched.

    Each result: ``{"name", "tags" (the group_by values), "count", "sum", "avg", "min",
    "max", "p50", "p95", "p99"}`` (one ``pN`` per entry of ``quantiles``), ordered by the
    group's tag values. No result when nothing matched.
    """
    keys = tuple(group_by or ())
    query = (
        "SELECT tags, count, sum, min, max, sketch FROM metric_rollups "
        "WHERE name = %s AND bucket_s = %s AND bucket_start >= %s AND bucket_start < %s"
    )
    params: list[Any] = [name, bucket_s, since, until]
    if tags:
        query += " AND tags @> %s"
        params.append(Jsonb(dict(tags)))
    groups: dict[tuple[str | None, ...], _Group] = {}
    with conn.cursor() as cur:
        for series_tags, count, total, lo, hi, sketch in cur.execute(query, params):
            group_key = tuple(series_tags.get(k) for k in keys)
            group = groups.get(group_key)
            if group is None:
                group = groups[group_key] = _Group()
            group.add(count, total, lo, hi, Sketch.from_json(sketch))
    results = []
    for group_key in sorted(groups, key=lambda gk: tuple((v is None, v or "") for v in gk)):
        g = groups[group_key]
        result: dict[str, Any] = {
            "name": name,
            "tags": dict(zip(keys, group_key, strict=True)),
            "count": g.count,
            "sum": g.total,
            "avg": g.total / g.count if g.count else None,
            "min": g.lo,
            "max": g.hi,
        }
        for q in quantiles:
            result[_label(q)] = g.sketch.quantile(q, lo=g.lo, hi=g.hi)
        results.append(result)
    return results
