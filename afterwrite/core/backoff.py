"""Backoff as a pure function (after dramatiq's ``compute_backoff``)."""

from __future__ import annotations

import random


def compute_backoff_s(
    attempts: int,
    *,
    factor_s: float = 0.5,
    max_backoff_s: float = 30.0,
    jitter: bool = True,
    rand: random.Random | None = None,
) -> float:
    """Delay before retry number ``attempts`` (1-based): exponential, capped, with full jitter
    so many workers that failed together do not retry together."""
    exp = min(max_backoff_s, factor_s * 2.0 ** max(attempts - 1, 0))
    if not jitter:
        return exp
    return float((rand or random).uniform(exp / 2, exp))
