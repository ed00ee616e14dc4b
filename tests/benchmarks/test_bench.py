"""A small run of the benchmark end to end: real worker, beat and baseline processes.

Not in the default run (``-m benchmark`` selects it). It asserts the shape of the result and
that every record arrived exactly once on every path; it asserts no performance figures: the
targets are judged by the benchmark's own output, on a quiet machine.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from rich.console import Console

from afterwrite.core.settings import Settings
from benchmarks.main import run_bench

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(900)]

ENTRIES = 20_000
CALLS = 2_000
BASELINE = 5_000
LATENCY_KEYS = {"p50_us", "p90_us", "p99_us", "p999_us", "max_us", "mean_us"}


def _latencies_ok(figures: dict[str, Any]) -> None:
    assert set(figures) == LATENCY_KEYS
    assert 0 < figures["p50_us"] <= figures["p99_us"] <= figures["max_us"]


def test_small_bench_every_row_exactly_once(settings: Settings, tmp_path: Any) -> None:
    out = io.StringIO()
    result = run_bench(
        settings,
        entries=ENTRIES,
        calls=CALLS,
        baseline=True,
        baseline_entries=BASELINE,
        compare_entries=ENTRIES // 2,
        console=Console(file=out, width=200),
        data_dir=tmp_path,
        # Not the database and broker of a full benchmark that may run at the same time.
        database="afterwrite_bench_test",
        broker_db=10,
        idle_s=5.0,
    )
    json.dumps(result)  # what `afterwrite bench --json` prints

    hot = result["hot_path"]
    assert hot["calls"] == CALLS
    assert hot["not_sent"] == 0
    assert hot["async_not_sent"] == 0
    for name in ("record_query", "raw_xadd", "async_record_query", "async_raw_xadd"):
        _latencies_ok(hot[name])
    assert hot["p99_ratio"] > 0

    drain = result["drain"]
    assert drain["entries"] == ENTRIES
    assert (drain["rows"], drain["missing"], drain["unexpected"]) == (ENTRIES, 0, 0)
    assert drain["dead_letters"] == 0
    assert drain["exactly_once"] is True
    assert drain["rows_per_s"] > 0
    assert drain["ceiling"]["rows"] == ENTRIES
    assert drain["ceiling"]["rows_per_s"] > 0
    assert drain["ratio_to_ceiling"] > 0
    rss = drain["worker_rss"]
    if rss["available"]:
        assert 0 < rss["start_mb"] <= rss["peak_mb"]
        assert rss["processes"] >= 1 + 2  # main process and its pool children

    lean = result["drain_lean"]
    assert lean["exactly_once"] is True
    assert lean["ceiling"]["payload_bytes_mean"] < drain["ceiling"]["payload_bytes_mean"]
    assert lean["cpu"]["worker_us_per_row"] is None or lean["cpu"]["worker_us_per_row"] > 0

    idle = result["idle"]
    assert idle["seconds"] >= 5.0
    assert idle["pipeline_pct"] == pytest.approx(idle["worker_pct"] + idle["beat_pct"], abs=0.02)

    small = result["drain_small"]
    assert small["entries"] == ENTRIES // 2
    assert small["exactly_once"] is True
    assert result["rss_bounded"]["small_entries"] == ENTRIES // 2

    base = result["baseline"]
    assert base["entries"] == BASELINE
    assert (base["rows"], base["missing"], base["unexpected"]) == (BASELINE, 0, 0)
    assert base["rejected"] == 0
    assert base["exactly_once"] is True
    _latencies_ok(base["apply_async"])
    assert base["rows_per_s"] > 0
    assert base["afterwrite_speedup"] > 0

    assert "afterwrite bench" in out.getvalue()  # the table was printed
