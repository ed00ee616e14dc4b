"""The HTTP load test of the example app: three recordings, same run, same load.

Not in the default run (``-m benchmark`` selects it). Unlike tests/benchmarks/test_bench.py it
asserts the performance target of issue 7: afterwrite direct's handler p99 at least 5x lower
than a synchronous ORM insert's, measured inside the app on the same machine in the same run.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from rich.console import Console

from afterwrite.core.settings import Settings
from benchmarks.loadtest import TARGET_P99_RATIO, run_loadtest

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(600)]


def test_afterwrite_direct_p99_is_5x_lower_than_a_sync_orm_insert(settings: Settings) -> None:
    out = io.StringIO()
    result: dict[str, Any] = run_loadtest(
        settings, seconds=8, warmup_s=2, connections=16, console=Console(file=out, width=200)
    )
    print(out.getvalue())
    print(json.dumps(result, indent=2))
    by = {r["recording"]: r for r in result["variants"]}
    assert set(by) == {"sync-orm", "direct", "background"}
    for r in by.values():
        assert r["requests"] > 0
        assert r["records_arrived"] >= r["requests"]  # every request's record was stored
        assert 0 < r["handler_p50_us"] <= r["handler_p99_us"] <= r["handler_max_us"]
        assert 0 < r["wrk_p50_us"] <= r["wrk_p99_us"]
        assert r["rps"] > 0
    ratio = by["sync-orm"]["handler_p99_us"] / by["direct"]["handler_p99_us"]
    assert ratio == pytest.approx(result["p99_ratio_direct"])
    assert ratio >= TARGET_P99_RATIO, f"direct p99 only {ratio:.1f}x lower than sync-orm's"
