"""A stand-in for an LLM call, so the examples run without an API key or network.

Deterministic: the same query and mode give the same answer. Replace :func:`complete` with your
model call; the rest of each example stays as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MODEL = "fake-llm-1"
LATENCY_ENV = "FAKE_LLM_LATENCY_MS"


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int


def complete(query: str, mode: str | None = None) -> Completion:
    text = f"[{mode or 'chat'}] You asked: {query.strip()!r}. A real model would answer here."
    return Completion(text, MODEL, len(query.split()), len(text.split()))


def latency_ms_from_env() -> float:
    """Simulated model latency in milliseconds (``FAKE_LLM_LATENCY_MS``, default 0)."""
    return float(os.environ.get(LATENCY_ENV, "0"))
