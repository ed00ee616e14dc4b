"""A mergeable quantile sketch (DDSketch-style log buckets), the Python half.

The same sketch is built in SQL when a metric batch is rolled up (``afterwrite.models.metric``) and
merged in SQL by ``afterwrite_sketch_merge`` (migration 0002); this module reads it back, merges it
across buckets and answers quantiles. Both halves compute a value's bucket with the same IEEE
operations (``ceil(ln(|v|) / LN_GAMMA)``, constants rendered from this module), so a sketch built in
PostgreSQL equals one built here from the same values.

Contract (relative accuracy ``ALPHA``): for ``0 <= q <= 1``, ``quantile(q)`` is within
``ALPHA * |x|`` of ``x``, the value of 0-based rank ``floor(q * (count - 1))`` among the values
added, for any set of values and after any number of merges. This holds for zero and for
``|v| >= MIN_INDEXABLE``; the rare ``0 < |v| < MIN_INDEXABLE`` are counted as zero.
Merging is exact (counts add), associative and commutative, so per-minute sketches combine
into any window without loss beyond ``ALPHA``.

Size grows with the log-range of the values, not their count: about 115 buckets per decade
spanned at ``ALPHA = 0.01`` (latencies from 1 ms to 100 s: ~580 buckets at most, usually far
fewer per minute). The JSON form is ``{"p": {key: count}, "n": {key: count}, "z": count}``:
positive values, negative values (keyed by magnitude) and zeros.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from typing import Any

ALPHA = 0.01
"""Relative accuracy of every quantile estimate."""
GAMMA = (1 + ALPHA) / (1 - ALPHA)
LN_GAMMA = math.log(GAMMA)
MIN_INDEXABLE = 1e-300
"""Magnitudes below this are counted as zero (their logarithmic key would be meaningless)."""
# The bucket (γ^(k-1), γ^k] is represented by 2γ^k/(γ+1): at most ALPHA away from either end.
_LN_REPRESENTATIVE = math.log(2 / (GAMMA + 1))


def bucket_key(magnitude: float) -> int:
    """The bucket of a magnitude ``>= MIN_INDEXABLE`` (same expression as the SQL half)."""
    return math.ceil(math.log(magnitude) / LN_GAMMA)


def bucket_value(key: int) -> float:
    """The representative magnitude of bucket ``key``."""
    try:
        return math.exp(key * LN_GAMMA + _LN_REPRESENTATIVE)
    except OverflowError:  # only the topmost bucket near the float maximum
        return sys.float_info.max


class Sketch:
    """A quantile sketch. Not thread-safe; cheap to build, merge and serialise."""

    __slots__ = ("negative", "positive", "zero")

    def __init__(self) -> None:
        self.positive: dict[int, int] = {}
        self.negative: dict[int, int] = {}
        """Keyed by the bucket of the magnitude ``-v``."""
        self.zero = 0

    @property
    def count(self) -> int:
        return self.zero + sum(self.positive.values()) + sum(self.negative.values())

    def add(self, value: float) -> None:
        """Add one finite value (ValueError for NaN or infinity)."""
        if not math.isfinite(value):
            raise ValueError(f"{value} is not finite")
        if value >= MIN_INDEXABLE:
            k = bucket_key(value)
            self.positive[k] = self.positive.get(k, 0) + 1
        elif value <= -MIN_INDEXABLE:
            k = bucket_key(-value)
            self.negative[k] = self.negative.get(k, 0) + 1
        else:
            self.zero += 1

    def extend(self, values: Iterable[float]) -> Sketch:
        for v in values:
            self.add(v)
        return self

    def merge(self, other: Sketch) -> Sketch:
        """Add ``other``'s counts into this sketch (in place; returns self)."""
        for mine, theirs in ((self.positive, other.positive), (self.negative, other.negative)):
            for k, c in theirs.items():
                mine[k] = mine.get(k, 0) + c
        self.zero += other.zero
        return self

    def quantile(
        self, q: float, *, lo: float | None = None, hi: float | None = None
    ) -> float | None:
        """The estimate for quantile ``q`` (see the module contract); None when empty.

        ``lo``/``hi`` (the exact min and max, when known) clamp the estimate, which only ever
        moves it towards the true value, and answer q=0 and q=1 exactly.
        """
        if not 0 <= q <= 1:
            raise ValueError(f"quantile {q} outside [0, 1]")
        n = self.count
        if n == 0:
            return None
        if q == 0 and lo is not None:
            return lo
        if q == 1 and hi is not None:
            return hi
        estimate = self._at_rank(q * (n - 1))
        if lo is not None:
            estimate = max(estimate, lo)
        if hi is not None:
            estimate = min(estimate, hi)
        return estimate

    def _at_rank(self, rank: float) -> float:
        seen = 0
        # Ascending order of value: negatives from the largest magnitude down, zeros, positives.
        for k in sorted(self.negative, reverse=True):
            seen += self.negative[k]
            if seen > rank:
                return -bucket_value(k)
        seen += self.zero
        if seen > rank:
            return 0.0
        top = 0.0
        for k in sorted(self.positive):
            seen += self.positive[k]
            top = bucket_value(k)
            if seen > rank:
                return top
        return top  # rank == count - 1 with float rounding: the largest value's bucket

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in ``metric_rollups.sketch``."""
        return {
            "p": {str(k): c for k, c in self.positive.items()},
            "n": {str(k): c for k, c in self.negative.items()},
            "z": self.zero,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sketch:
        """Parse the JSON form; ValueError when it is not one."""
        sketch = cls()
        try:
            sketch.positive = {int(k): int(c) for k, c in dict(data.get("p") or {}).items()}
            sketch.negative = {int(k): int(c) for k, c in dict(data.get("n") or {}).items()}
            sketch.zero = int(data.get("z") or 0)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a sketch: {exc}") from None
        return sketch

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sketch):
            return NotImplemented
        return (self.positive, self.negative, self.zero) == (
            other.positive,
            other.negative,
            other.zero,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Sketch(count={self.count}, buckets={len(self.positive) + len(self.negative)})"
