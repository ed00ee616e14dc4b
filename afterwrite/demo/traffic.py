"""Realistic LLM query-history traffic for the demo, the benchmark and the acceptance tests.

Shapes follow what multi-model orchestrators and RAG services record: several models, modes
(chat, RAG, agent, side-by-side compare), answers of a few hundred to a few thousand
characters, log-normal latencies, token counts, and the retrieved chunks used. Deterministic for
a given seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from afterwrite.producer.records import QueryRecord, query_record

MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "claude-3-5-sonnet",
    "llama-3.1-70b-instruct",
    "mistral-large",
    "gemini-1.5-pro",
)
MODES = ("chat", "rag", "agent", "compare")
_TOPICS = (
    "vector databases",
    "retrieval-augmented generation",
    "prompt caching",
    "tokenizer limits",
    "fine-tuning costs",
    "agent tool calling",
    "evaluation of RAG answers",
    "context window sizes",
)
_ASKS = (
    "Explain {t} to a new engineer.",
    "What are the trade-offs of {t}?",
    "Compare two approaches to {t} with examples.",
    "Summarise the document about {t} in five bullet points.",
    "Write a Python snippet that demonstrates {t}.",
    "Why does {t} matter for latency?",
)
_WORDS = (  # noqa: SIM905 (a sentence reads better than a list of 40 words)
    "the model retrieves relevant chunks and ranks them by similarity before the answer is "
    "generated with citations so that users can verify each claim against its source while "
    "latency stays within budget and token usage is tracked per request for cost reports"
).split()


def query_kwargs(rng: random.Random, *, user_count: int = 500) -> dict[str, Any]:
    """Keyword arguments for one ``client.record_query`` call."""
    mode = rng.choices(MODES, weights=(50, 30, 15, 5))[0]
    n_models = 2 if mode == "compare" else 1
    models = rng.sample(MODELS, n_models)
    words = rng.randint(30, 400)
    response = " ".join(rng.choice(_WORDS) for _ in range(words))
    prompt_tokens = rng.randint(20, 1500) + (800 if mode == "rag" else 0)
    kwargs: dict[str, Any] = {
        "query": rng.choice(_ASKS).format(t=rng.choice(_TOPICS)),
        "response": response,
        "user_id": f"user-{rng.randrange(user_count):04d}",
        "session_id": f"conv-{rng.randrange(user_count * 20):06d}",
        "mode": mode,
        "model_ids": models,
        "response_time_ms": round(rng.lognormvariate(6.8, 0.6), 1),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": max(1, int(words * 1.3)),
        "metadata": {"app": "demo", "region": rng.choice(("eu-west", "us-east", "ap-south"))},
    }
    if mode == "rag":
        kwargs["retrieval"] = {
            "top_k": 5,
            "chunks": [
                {"doc": f"doc-{rng.randrange(5000)}", "score": round(rng.random(), 3)}
                for _ in range(5)
            ],
        }
    return kwargs


def queries(count: int, *, seed: int = 7) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for _ in range(count):
        yield query_kwargs(rng)


def as_record(kwargs: dict[str, Any]) -> QueryRecord:
    """The stream payload ``record_query(**kwargs)`` would send (for preloading backlogs)."""
    return query_record(**kwargs)
