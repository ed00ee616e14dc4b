"""A small run of the history benchmark on the test database: real fill, real reads.

Not in the default run (``-m benchmark`` selects it). It checks the shape of the result and
that every read found what it looked for; the targets are judged from the full run on
1,000,000 rows (``afterwrite bench --suite history``).
"""

from __future__ import annotations

import json

import pytest

from afterwrite.demo.services import Endpoints
from benchmarks.history import measure_history

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(600)]


def test_small_history_bench(endpoints: Endpoints) -> None:
    result = measure_history(endpoints.database_url, rows=20_000, calls=50, log=lambda _: None)
    json.dumps(result)
    reads = result["reads"]
    assert len(reads) == 7 + 3  # the full-text reads again, with responses indexed
    assert result["responses_fill_s"] > 0
    for name, figures in reads.items():
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"], name
        assert figures["avg_records"] > 0, name  # every read is of something that exists
    assert reads["get (one record)"]["avg_records"] == 1
