"""Embedding cost: provider requests batched vs one per text, and the offline model's speed.

``measure_embeddings`` runs (a) ``n_texts`` realistic texts through ``make_embedder`` /
``embed_many`` against the local fake OpenAI server, and the naive baseline (one
``embeddings.create`` per text, the same client and server); (b) every offline model on
``local_texts`` texts of 1-3 sentences, and its load time. Blocking; starts and stops its own
server; touches no database.
"""

from __future__ import annotations

import random
import time
from typing import Any

from afterwrite.core.settings import LOCAL_MODELS, load_settings
from afterwrite.embedders.openai_provider import OpenAIEmbedder
from afterwrite.embedders.providers import LOCAL_MODEL_ID, make_embedder
from benchmarks.offline_models import offline_embedder
from tests.fake_openai_server import running

_WORDS = [
    "the",
    "a",
    "user",
    "asked",
    "why",
    "the",
    "worker",
    "retried",
    "batch",
    "after",
    "redis",
    "restarted",
    "and",
    "postgres",
    "answer",
    "index",
    "vectors",
    "model",
    "latency",
    "tokens",
    "stream",
    "search",
    "results",
    "were",
    "slow",
    "fast",
    "query",
    "document",
    "chunk",
    "embedding",
    "provider",
    "limit",
    "request",
    "timeout",
    "cache",
    "hit",
    "miss",
    "new",
]


def realistic_texts(n: int, *, seed: int = 11) -> list[str]:
    """``n`` distinct texts of 1-3 sentences of 6-18 words each."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        sentences = [
            " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 18))).capitalize() + "."
            for _ in range(rng.randint(1, 3))
        ]
        texts.append(f"{' '.join(sentences)} ({i})")
    return texts


def measure_embeddings(
    n_texts: int = 10_000,
    *,
    local_texts: int = 2_000,
    baseline_texts: int | None = None,
    model: str = "text-embedding-3-small",
    dimensions: int | None = 256,
) -> dict[str, Any]:
    """Figures as a dict (requests, seconds, texts/s). ``baseline_texts`` (default all)
    limits the naive run; its request count is then scaled up to ``n_texts``."""
    texts = realistic_texts(n_texts)
    out: dict[str, Any] = {"n_texts": n_texts, "model": model, "dimensions": dimensions}
    with running() as server:
        settings = load_settings(
            {},
            embedding_provider="openai",
            openai_api_key=server.api_key,
            openai_base_url=server.base_url,
            embedding_dimensions=dimensions,
        )
        embedder = make_embedder(settings, model)
        started = time.perf_counter()
        result = embedder.embed_many(texts)
        batched_s = time.perf_counter() - started
        assert len(result.vectors) == n_texts, result.failed
        client = embedder.client if isinstance(embedder, OpenAIEmbedder) else None
        assert client is not None
        naive = texts[: baseline_texts or n_texts]
        extra: dict[str, Any] = {"dimensions": dimensions} if dimensions else {}
        before = len(server.requests)
        started = time.perf_counter()
        for text in naive:
            client.embeddings.create(model=model, input=text, **extra)
        naive_s = time.perf_counter() - started
        naive_requests = (len(server.requests) - before) * n_texts / len(naive)
        if isinstance(embedder, OpenAIEmbedder):
            embedder.close()
    out["batched"] = {
        "requests": result.requests,
        "tokens": result.tokens,
        "wall_s": round(batched_s, 3),
        "texts_per_s": round(n_texts / batched_s),
    }
    out["naive"] = {
        "requests": round(naive_requests),
        "measured_texts": len(naive),
        "wall_s": round(naive_s * n_texts / len(naive), 3),
        "texts_per_s": round(len(naive) / naive_s),
    }
    out["request_reduction"] = round(naive_requests / result.requests, 1)
    out["local"] = {model: measure_local(local_texts, model) for model in LOCAL_MODELS}
    return out


def measure_local(n_texts: int = 2_000, model: str = LOCAL_MODEL_ID) -> dict[str, Any]:
    """An offline model: load time (verification included), texts/s and texts per CPU-second
    (all threads; a busy machine inflates it less than wall time)."""
    embedder = offline_embedder(model)
    load_s = embedder.load()
    texts = realistic_texts(n_texts, seed=5)
    embedder.embed_many(texts[:32])  # warm-up: first-run allocations
    started, cpu = time.perf_counter(), time.process_time()
    result = embedder.embed_many(texts)
    wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    assert len(result.vectors) == n_texts
    return {
        "texts": n_texts,
        "load_s": round(load_s, 3),
        "wall_s": round(wall_s, 3),
        "texts_per_s": round(n_texts / wall_s),
        "texts_per_cpu_s": round(n_texts / cpu_s),
        "mean_tokens": round(result.tokens / n_texts, 1),
    }


if __name__ == "__main__":  # python -m benchmarks.embed
    import json

    print(json.dumps(measure_embeddings(), indent=2))
