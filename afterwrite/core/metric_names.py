"""The one registry of afterwrite's Prometheus metric names.

``METRICS`` holds name, type, help and labels of every metric afterwrite exposes: those the
metrics server computes (``afterwrite.worker.operations.exporter``) and the producer's
(``afterwrite.producer.prometheus.ProducerCollector``), which is why it lives in the core that
both sides share. docs/monitoring.md is checked against it by a test.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


@dataclass(frozen=True)
class MetricSpec:
    name: str
    """Without the ``_total`` suffix counters get in the exposition."""
    type: str
    """``gauge`` or ``counter``."""
    help: str
    labels: tuple[str, ...] = ()
    source: str = "worker"
    """``worker``: afterwrite metrics-server; ``producer``: the application's own /metrics."""

    @property
    def exposed_names(self) -> tuple[str, ...]:
        """Sample names as they appear in the text exposition."""
        return (self.name + "_total",) if self.type == "counter" else (self.name,)


def _g(name: str, help_: str, *labels: str, source: str = "worker") -> MetricSpec:
    return MetricSpec(name, "gauge", help_, labels, source)


def _c(name: str, help_: str, *labels: str, source: str = "worker") -> MetricSpec:
    return MetricSpec(name, "counter", help_, labels, source)


METRICS: tuple[MetricSpec, ...] = (
    _g("afterwrite_up", "1 when the component answered this scrape, else 0.", "component"),
    _g("afterwrite_scrape_duration_seconds", "Time to read a component.", "component"),
    # streams
    _g("afterwrite_stream_length", "Entries in the kind's stream (the backlog).", "kind"),
    _g(
        "afterwrite_stream_oldest_entry_age_seconds",
        "Age of the oldest entry still in the stream (0 when empty).",
        "kind",
    ),
    _g("afterwrite_stream_pending", "Entries delivered to a worker, not yet acked.", "kind"),
    _g("afterwrite_stream_consumers", "Consumers in the kind's consumer group.", "kind"),
    _c(
        "afterwrite_stream_entries_added",
        "Entries ever added to the stream (Redis entries-added).",
        "kind",
    ),
    _c(
        "afterwrite_stream_entries_drained",
        "Entries that left the stream: stored or dead-lettered (added minus length). "
        "rate() of it is the drain rate.",
        "kind",
    ),
    # tables and dead letters
    _g("afterwrite_table_rows", "Rows in the kind's table (estimated when large).", "kind"),
    _g(
        "afterwrite_dead_letters",
        "Dead letters stored, by kind, reason and error code.",
        "kind",
        "reason",
        "error_code",
    ),
    # freshness
    _g(
        "afterwrite_freshness_seconds",
        "End-to-end freshness over the last hour: percentiles (stat p50, p90, p99) of "
        "enqueue_to_committed (per kind), committed_to_embedded and embedded_to_searchable "
        "(per collection).",
        "stage",
        "scope",
        "stat",
    ),
    _g(
        "afterwrite_freshness_samples",
        "Entries the freshness quantiles were computed from.",
        "stage",
        "scope",
    ),
    _g(
        "afterwrite_freshness_max_seconds",
        "Largest delay of the stage in the window.",
        "stage",
        "scope",
    ),
    _g(
        "afterwrite_unsearchable_embeddings",
        "Embeddings written in the last hour that no published index covers yet.",
        "collection",
    ),
    _g(
        "afterwrite_unsearchable_oldest_age_seconds",
        "Age of the oldest embedding no published index covers yet (0 when none).",
        "collection",
    ),
    # embeddings
    _g(
        "afterwrite_embedding_backlog",
        "Embedding jobs not embedded yet: committed jobs plus the embed stream.",
    ),
    _c(
        "afterwrite_embedding_events",
        "Embedding stage counters: requests, inputs, tokens, cache_hits, unchanged, embedded, "
        "failed, throttled, truncated.",
        "event",
    ),
    _g(
        "afterwrite_embedding_cache_hit_ratio",
        "(cache_hits + unchanged) / (cache_hits + unchanged + embedded), since the counters "
        "started.",
    ),
    # indexes
    _g("afterwrite_index_version", "Version of the published index.", "collection"),
    _g(
        "afterwrite_index_age_seconds",
        "Seconds since the published index was built (its manifest's built_at).",
        "collection",
    ),
    _g("afterwrite_index_vectors", "Vectors in the published index.", "collection"),
    _g(
        "afterwrite_index_last_publish_age_seconds",
        "Seconds since the newest published build or delta (index_builds).",
        "collection",
    ),
    # producer, exported by the application (afterwrite.producer.prometheus.ProducerCollector)
    _c(
        "afterwrite_producer_records",
        "record_* outcomes: recorded, sent, spilled, replayed, dropped, invalid.",
        "outcome",
        source="producer",
    ),
    _c(
        "afterwrite_producer_not_sent",
        "Why entries were spilled or dropped: failed, over_cap, buffer_full.",
        "reason",
        source="producer",
    ),
    _g(
        "afterwrite_producer_buffered",
        "Entries in the background buffer now.",
        source="producer",
    ),
)

SPECS = {m.name: m for m in METRICS}


def family(
    name: str, labels: Iterable[str] | None = None
) -> CounterMetricFamily | GaugeMetricFamily:
    """An empty metric family for registered metric ``name`` (KeyError for an unknown one)."""
    spec = SPECS[name]
    label_names = list(spec.labels if labels is None else labels)
    if spec.type == "counter":
        return CounterMetricFamily(name, spec.help, labels=label_names)
    return GaugeMetricFamily(name, spec.help, labels=label_names)
