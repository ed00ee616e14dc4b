"""Embedding benchmark, small: batching must cut provider requests at least 50x.

Not in the default run (``-m benchmark`` selects it).
"""

from __future__ import annotations

import pytest

from afterwrite.core.settings import LOCAL_MODELS
from benchmarks.embed import measure_embeddings

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(600)]


def test_batching_cuts_requests_at_least_50x() -> None:
    figures = measure_embeddings(5_000, local_texts=300)
    batched, naive = figures["batched"], figures["naive"]
    assert naive["requests"] == 5_000
    assert batched["requests"] <= 10  # 2,048 inputs, 300,000 tokens (bytes) per request
    assert figures["request_reduction"] >= 50
    assert batched["wall_s"] < naive["wall_s"]
    assert set(figures["local"]) == set(LOCAL_MODELS)  # every offline model
    for local in figures["local"].values():
        assert local["texts"] == 300
        assert local["texts_per_s"] > 0
        assert local["texts_per_cpu_s"] > 0
        assert local["load_s"] > 0
