"""client.record_metric → rollups, through the real producer and drain."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg

from afterwrite.core.settings import Settings
from afterwrite.producer import Client
from afterwrite.worker.operations.metric_rollups import summary
from afterwrite.worker.runtime import Runtime


def test_record_metric_points_roll_up(settings: Settings, pg: psycopg.Connection[Any]) -> None:
    ts = datetime(2026, 11, 22, 10, 0, 30, tzinfo=UTC)
    with Client.from_env(settings) as client:
        for value in (100.0, 200.0, 300.0):
            assert client.record_metric("llm.latency_ms", value, {"model": "gpt-4o"}, ts).accepted
        client.record_metric("llm.latency_ms", 50.0, ts=ts)  # no tags
        bad = client.record_metric("llm.latency_ms", float("nan"), {"model": "gpt-4o"}, ts)
    rt = Runtime(settings)
    try:
        report = rt.drain("metric").run(budget_s=5)
    finally:
        rt.close()
    assert (report.inserted, report.dead_lettered) == (4, 1)
    assert pg.execute("SELECT event_id FROM dead_letters").fetchone() == (bad,)
    (row,) = summary(
        pg,
        "llm.latency_ms",
        since=datetime(2026, 11, 22, 10, 0, tzinfo=UTC),
        until=datetime(2026, 11, 22, 10, 1, tzinfo=UTC),
        tags={"model": "gpt-4o"},
    )
    assert (row["count"], row["sum"], row["min"], row["max"]) == (3, 600.0, 100.0, 300.0)
    assert abs(row["p50"] - 200.0) <= 2.0  # the sketch's 1% bound
