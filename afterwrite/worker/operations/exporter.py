"""Prometheus metrics: the one registry of afterwrite's metric names, and the collector that
computes them at scrape time from Redis and PostgreSQL.

Nothing is counted in-process: every value is read when Prometheus scrapes
(``afterwrite metrics-server``), so the figures are the same whichever worker processes run, and
a restarted metrics server loses nothing. Each scrape opens short-lived connections with short
timeouts; a component that does not answer is reported as ``afterwrite_up{component=…} 0`` and
its metrics are left out of that scrape, never a failed scrape.

The metric names, types, help texts and labels come from the one registry,
``afterwrite.core.metric_names.METRICS`` (the producer's collector uses it too).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from afterwrite.core import logs
from afterwrite.core.metric_names import METRICS, family
from afterwrite.core.settings import Settings

if TYPE_CHECKING:
    from afterwrite.worker.operations.freshness import Distribution
    from afterwrite.worker.operations.status import EmbeddingStatus, IndexStatus

log = logging.getLogger("afterwrite.prometheus")

REDIS_TIMEOUT_S = 2.0
POSTGRES_CONNECT_TIMEOUT_S = 3
POSTGRES_STATEMENT_TIMEOUT_MS = 5_000


class Families:
    """The families of one scrape, created on first use, yielded in registry order."""

    def __init__(self) -> None:
        self._families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}

    def add(self, name: str, labels: Iterable[str], value: float) -> None:
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = family(name)
        fam.add_metric(list(labels), value)

    def __iter__(self) -> Iterator[Metric]:
        return (self._families[m.name] for m in METRICS if m.name in self._families)


class AfterwriteCollector(Collector):
    """Reads the pipeline's state at each scrape. Safe to register in any CollectorRegistry."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def describe(self) -> list[Metric]:
        return [family(m.name) for m in METRICS if m.source == "worker"]

    def collect(self) -> Iterator[Metric]:
        out = Families()
        embedding = self._redis(out)
        conn = self._connect(out)
        if conn is not None:
            try:
                jobs = self._postgres_metrics(out, conn)
            finally:
                conn.close()
            if embedding is not None and jobs is not None:
                out.add("afterwrite_embedding_backlog", [], embedding.stream_length + jobs)
        yield from out

    # -- components -------------------------------------------------------------------------
    def _down(self, out: Families, component: str, exc: Exception, started: float) -> None:
        out.add("afterwrite_up", [component], 0)
        out.add("afterwrite_scrape_duration_seconds", [component], time.perf_counter() - started)
        log.warning(
            "metrics: %s unavailable: %s",
            component,
            logs.mask(f"{type(exc).__name__}: {exc}"),
            extra={"action": "scrape_failed", "component": component},
        )

    def _redis(self, out: Families) -> EmbeddingStatus | None:
        """Stream and embedding-stage figures; the embedding status without its table part."""
        import redis

        from afterwrite.models.embedding import EMBED_KIND
        from afterwrite.models.registry import kinds
        from afterwrite.worker.operations.status import embedding_status, stream_status

        started = time.perf_counter()
        r = redis.Redis.from_url(
            self.settings.require_redis_url(),
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
        )
        try:
            streams = [stream_status(r, self.settings, k.name) for k in kinds]
            added = {s.kind: _entries_added(r, s.stream) for s in streams}
            embedding = embedding_status(r, None, self.settings) if EMBED_KIND in kinds else None
        except (redis.RedisError, OSError) as exc:
            self._down(out, "redis", exc, started)
            return None
        finally:
            r.close()
        out.add("afterwrite_up", ["redis"], 1)
        out.add("afterwrite_scrape_duration_seconds", ["redis"], time.perf_counter() - started)
        for s in streams:
            out.add("afterwrite_stream_length", [s.kind], s.length)
            out.add("afterwrite_stream_oldest_entry_age_seconds", [s.kind], s.oldest_age_s or 0.0)
            out.add("afterwrite_stream_pending", [s.kind], s.pending)
            out.add("afterwrite_stream_consumers", [s.kind], s.consumers)
            n = added[s.kind]
            if n is not None:
                out.add("afterwrite_stream_entries_added", [s.kind], n)
                out.add("afterwrite_stream_entries_drained", [s.kind], max(0, n - s.length))
        if embedding is not None:
            for event, value in embedding.counters.items():
                out.add("afterwrite_embedding_events", [event], value)
            if embedding.cache_hit_rate is not None:
                out.add("afterwrite_embedding_cache_hit_ratio", [], embedding.cache_hit_rate)
        return embedding

    def _connect(self, out: Families) -> Any:
        import psycopg

        started = time.perf_counter()
        try:
            return psycopg.connect(
                self.settings.require_database_url(),
                autocommit=True,
                connect_timeout=POSTGRES_CONNECT_TIMEOUT_S,
                options=f"-c statement_timeout={POSTGRES_STATEMENT_TIMEOUT_MS}",
            )
        except Exception as exc:
            self._down(out, "postgres", exc, started)
            return None

    def _postgres_metrics(self, out: Families, conn: Any) -> int | None:
        """Tables, dead letters, freshness, indexes; returns the embedding jobs waiting."""
        from afterwrite.models.embedding import EMBED_KIND
        from afterwrite.models.registry import kinds
        from afterwrite.worker.operations.freshness import collect_freshness
        from afterwrite.worker.operations.status import (
            dead_letter_breakdown,
            index_status,
            table_status,
        )

        started = time.perf_counter()
        try:
            tables = [table_status(conn, k.name, k.table.name) for k in kinds]
            dead = dead_letter_breakdown(conn)
            freshness = collect_freshness(conn, list(kinds))
            indexes = index_status(self.settings, conn)
        except Exception as exc:  # a statement timeout, or the server went away mid-scrape
            self._down(out, "postgres", exc, started)
            return None
        out.add("afterwrite_up", ["postgres"], 1)
        out.add("afterwrite_scrape_duration_seconds", ["postgres"], time.perf_counter() - started)
        for t in tables:
            out.add("afterwrite_table_rows", [t.kind], t.rows)
        for kind, reason, code, n in dead:
            out.add("afterwrite_dead_letters", [kind, reason, code], n)
        _add_freshness(out, freshness)
        _add_indexes(out, indexes)
        return next((t.rows for t in tables if t.kind == EMBED_KIND), None)


def _add_freshness(out: Families, freshness: Iterable[Distribution]) -> None:
    for d in freshness:
        for q, value in d.quantiles().items():
            if value is not None:
                out.add("afterwrite_freshness_seconds", [d.stage, d.scope, _stat(q)], value)
        out.add("afterwrite_freshness_samples", [d.stage, d.scope], d.samples)
        if d.max_s is not None:
            out.add("afterwrite_freshness_max_seconds", [d.stage, d.scope], d.max_s)
        if d.stage == "embedded_to_searchable":
            out.add("afterwrite_unsearchable_embeddings", [d.scope], d.waiting)
            out.add(
                "afterwrite_unsearchable_oldest_age_seconds", [d.scope], d.oldest_waiting_s or 0
            )


def _stat(q: float) -> str:
    """``p50``, ``p90``, ``p99`` for 0.5, 0.9, 0.99: the label value of a percentile. Not a
    ``quantile`` label: Prometheus reserves that for summaries (promtool rejects it on a gauge).
    """
    return f"p{round(q * 100):g}"


def _add_indexes(out: Families, indexes: Iterable[IndexStatus]) -> None:
    for i in indexes:
        if isinstance(i.version, int):
            out.add("afterwrite_index_version", [i.collection], i.version)
        if i.age_s is not None:
            out.add("afterwrite_index_age_seconds", [i.collection], i.age_s)
        if i.vector_count is not None:
            out.add("afterwrite_index_vectors", [i.collection], i.vector_count)
        if i.last_publish_age_s is not None:
            out.add(
                "afterwrite_index_last_publish_age_seconds", [i.collection], i.last_publish_age_s
            )


def _entries_added(r: Any, key: str) -> int | None:
    """Redis ≥ 7 keeps a stream's entries-added; None before that or without the stream."""
    import redis

    try:
        info = r.xinfo_stream(key)
    except redis.ResponseError:  # no such stream yet
        return 0
    value = info.get("entries-added")
    return None if value is None else int(value)


def registry(settings: Settings) -> Any:
    """A CollectorRegistry holding only the afterwrite collector (what metrics-server serves)."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(AfterwriteCollector(settings))
    return reg
