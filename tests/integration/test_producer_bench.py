"""The producer measurements run end to end (small numbers: a smoke test, not a benchmark)."""

from __future__ import annotations

import redis

from afterwrite.core.settings import Settings
from benchmarks.producer import BENCH_PREFIX, measure_producer, table_rows


def test_measure_producer_reports_every_figure_and_cleans_up(
    settings: Settings, rdb: redis.Redis
) -> None:
    result = measure_producer(settings, calls=300)
    for key in ("direct", "build_encode_paced", "background_paced", "background_tight"):
        assert 0 < result[key]["p50_us"] <= result[key]["p99_us"]
    assert result["background_paced"]["stats"]["dropped"] == 0
    assert result["background_paced"]["stats"]["recorded"] == 300 + result["warmup_calls"]
    assert result["replay"]["entries"] == 300 + result["warmup_calls"]
    assert result["replay"]["entries_per_s"] > 0
    assert result["spill"]["append"]["mean_us"] > 0
    assert len(table_rows(result)) == 7
    assert list(rdb.scan_iter(match=f"{BENCH_PREFIX}:*")) == []
