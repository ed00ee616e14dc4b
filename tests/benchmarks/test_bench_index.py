"""A small run of the index benchmark: real PostgreSQL, real builds, real readers.

Not in the default run (``-m benchmark`` selects it). It checks the shape of the result and
the recall; performance targets are judged from the full run's output on a quiet machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afterwrite.demo.services import Endpoints
from benchmarks.index import measure_index
from tests.index_helpers import index_settings

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(900)]


def test_small_index_bench(endpoints: Endpoints, tmp_path: Path) -> None:
    settings = index_settings(endpoints, tmp_path, index_exact_max_vectors=5_000)
    result = measure_index((2_000, 60_000), 64, settings=settings, queries=50, log=lambda _: None)
    json.dumps(result)
    small, large = result["sizes"]["2000"], result["sizes"]["60000"]
    assert small["index_type"] == "IDMap2,Flat"
    assert large["index_type"].startswith("IVF")
    for figures in (small, large):
        assert set(figures["timings"]) >= {"read_s", "build_s", "write_s"}
        assert figures["recall_at_10"] >= 0.95
        assert figures["reader_load_s"] > 0
        for latency in figures["search"].values():
            assert 0 < latency["p50_ms"] <= latency["p99_ms"]
        assert set(figures["filtered_search"]) == {"50%", "1%", "0.1%"}
        for latency in figures["filtered_search"].values():
            assert 0 < latency["p50_ms"] <= latency["p99_ms"]
            assert latency["path"] in {"broad", "selective"}
        assert figures["documents_bytes_per_doc"] > 17
    assert "HNSW32" in large["search"]
