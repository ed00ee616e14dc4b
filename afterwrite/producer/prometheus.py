"""The producer's counters as Prometheus metrics, for the application's own ``/metrics``.

Spills and drops happen inside the application's processes, so only the application can
export them. Register one collector per client in the registry the application serves::

    from prometheus_client import REGISTRY
    from afterwrite.producer.prometheus import ProducerCollector

    REGISTRY.register(ProducerCollector(client))

Metric names come from afterwrite's one registry (``afterwrite.core.metric_names.METRICS``,
listed in docs/monitoring.md): ``afterwrite_producer_records_total{outcome}``,
``afterwrite_producer_not_sent_total{reason}`` and ``afterwrite_producer_buffered``. Values are read
from ``client.stats.snapshot()`` at scrape time; nothing is added to the hot path. With several
worker processes (gunicorn), each process exports its own counters (use prometheus-client's
multiprocess mode or scrape each process).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from afterwrite.core.metric_names import family
from afterwrite.producer.records import ProducerStats

OUTCOMES = ("recorded", "sent", "spilled", "replayed", "dropped", "invalid")
REASONS = ("failed", "over_cap", "buffer_full")


class _HasStats(Protocol):
    @property
    def stats(self) -> ProducerStats: ...


class ProducerCollector(Collector):
    """Exports one client's ``stats`` (a ``producer.Client`` or ``producer.AsyncClient``)."""

    def __init__(self, client: _HasStats) -> None:
        self._client = client

    def describe(self) -> list[Metric]:
        return [
            family("afterwrite_producer_records"),
            family("afterwrite_producer_not_sent"),
            family("afterwrite_producer_buffered"),
        ]

    def collect(self) -> Iterator[Metric]:
        snap = self._client.stats.snapshot()
        records = family("afterwrite_producer_records")
        for outcome in OUTCOMES:
            records.add_metric([outcome], snap.get(outcome, 0))
        not_sent = family("afterwrite_producer_not_sent")
        for reason in REASONS:
            not_sent.add_metric([reason], snap.get(reason, 0))
        buffered = family("afterwrite_producer_buffered")
        buffered.add_metric([], snap.get("buffered", 0))
        yield from (records, not_sent, buffered)
