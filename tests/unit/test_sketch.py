"""The quantile sketch keeps its documented bound, merges exactly, and round-trips as JSON."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable

import pytest

from afterwrite.core.sketch import ALPHA, MIN_INDEXABLE, Sketch, bucket_key, bucket_value

N = 100_000
QUANTILES = (0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)
# Rounding of exp/log in the representative value, far below ALPHA.
SLACK = 1e-12


def _lognormal(r: random.Random) -> float:
    return r.lognormvariate(math.log(200.0), 1.2)  # LLM latencies in ms, long tail


def _uniform(r: random.Random) -> float:
    return r.uniform(0.0, 1000.0)


def _signed(r: random.Random) -> float:
    # negatives, exact zeros and tiny magnitudes mixed: scores, deltas, costs
    pick = r.random()
    if pick < 0.1:
        return 0.0
    if pick < 0.4:
        return -r.expovariate(0.01)
    if pick < 0.5:
        return r.uniform(-1e-6, 1e-6)
    return r.paretovariate(1.5)


def _integers(r: random.Random) -> float:
    return float(r.randint(0, 4096))  # token counts: many ties


DISTRIBUTIONS: dict[str, Callable[[random.Random], float]] = {
    "lognormal": _lognormal,
    "uniform": _uniform,
    "signed": _signed,
    "integers": _integers,
}


def _worst_relative_error(values: list[float], sketch: Sketch) -> float:
    ordered = sorted(values)
    worst = 0.0
    for q in QUANTILES:
        exact = ordered[math.floor(q * (len(ordered) - 1))]
        estimate = sketch.quantile(q)
        assert estimate is not None
        if exact == 0:
            assert estimate == 0, (q, estimate)
            continue
        worst = max(worst, abs(estimate - exact) / abs(exact))
    return worst


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_quantiles_within_the_relative_bound(dist: str) -> None:
    r = random.Random(dist)
    values = [DISTRIBUTIONS[dist](r) for _ in range(N)]
    sketch = Sketch().extend(values)
    assert sketch.count == N
    assert _worst_relative_error(values, sketch) <= ALPHA + SLACK


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_merged_parts_equal_the_whole_and_keep_the_bound(dist: str) -> None:
    r = random.Random(f"merge-{dist}")
    values = [DISTRIBUTIONS[dist](r) for _ in range(N)]
    # 100 "minute buckets" of uneven size, merged as a read over a window would
    cuts = sorted(r.sample(range(1, N), 99))
    parts = [values[a:b] for a, b in zip([0, *cuts], [*cuts, N], strict=True)]
    merged = Sketch()
    for part in parts:
        merged.merge(Sketch().extend(part))
    assert merged == Sketch().extend(values)
    assert _worst_relative_error(values, merged) <= ALPHA + SLACK


def test_every_value_lands_in_a_bucket_that_represents_it() -> None:
    r = random.Random(7)
    magnitudes = [10 ** r.uniform(-300, 308) for _ in range(20_000)]
    magnitudes += [MIN_INDEXABLE, 1.0, 2.0, 1e308, 1.7976931348623157e308]
    for v in magnitudes:
        representative = bucket_value(bucket_key(v))
        assert abs(representative - v) <= (ALPHA + SLACK) * v, v


def test_clamping_to_min_and_max_makes_the_ends_exact() -> None:
    values = [3.7, 12.25, 999.0]
    sketch = Sketch().extend(values)
    assert sketch.quantile(0, lo=3.7, hi=999.0) == 3.7
    assert sketch.quantile(1, lo=3.7, hi=999.0) == 999.0


def test_json_round_trip_is_plain_json() -> None:
    sketch = Sketch().extend([-5.0, 0.0, 0.0, 1.5, 1e-320, 2e9])
    data = json.loads(json.dumps(sketch.to_json()))
    assert set(data) == {"p", "n", "z"}
    assert data["z"] == 3  # 1e-320 is below MIN_INDEXABLE: counted as zero
    assert Sketch.from_json(data) == sketch


def test_empty_and_invalid_input() -> None:
    assert Sketch().quantile(0.5) is None
    assert Sketch.from_json({"p": {}, "n": {}, "z": 0}) == Sketch()
    with pytest.raises(ValueError, match="not finite"):
        Sketch().add(math.nan)
    with pytest.raises(ValueError, match="not finite"):
        Sketch().add(math.inf)
    with pytest.raises(ValueError, match="outside"):
        Sketch().quantile(1.5)
    with pytest.raises(ValueError, match="not a sketch"):
        Sketch.from_json({"p": {"x": 1}})
