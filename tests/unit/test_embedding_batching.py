"""The request planner and the pure retry decisions of the embedding layer."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from afterwrite.embedders.openai_provider import AimdLimit, parse_response, retry_after_s
from afterwrite.embedders.providers import Limits, plan_requests
from afterwrite.embedders.tokens import ByteBound


def _random_case(rng: random.Random) -> tuple[list[int], Limits]:
    limits = Limits(
        max_inputs=rng.randint(1, 50),
        max_input_tokens=rng.randint(1, 400),
        max_request_tokens=rng.randint(1, 2000),
    )
    n = rng.randint(0, 300)
    top = limits.max_input_tokens * 2
    counts = [rng.choice([0, 1, rng.randint(1, top), rng.randint(1, 30)]) for _ in range(n)]
    return counts, limits


@pytest.mark.parametrize("overlong", ["truncate", "dead_letter"])
def test_every_request_within_limits_and_every_input_placed_once(overlong: str) -> None:
    rng = random.Random(20240605)
    for _ in range(400):
        counts, limits = _random_case(rng)
        plan = plan_requests(counts, limits, overlong)
        per_input = min(limits.max_input_tokens, limits.max_request_tokens)
        placed = [i for request in plan.requests for i in request]
        assert len(placed) == len(set(placed))
        assert set(placed).isdisjoint(plan.failed)
        assert set(placed) | set(plan.failed) == set(range(len(counts)))
        assert len(plan.request_tokens) == len(plan.requests)
        for request, tokens in zip(plan.requests, plan.request_tokens, strict=True):
            assert request, "no empty request"
            assert request == sorted(request), "input order kept"
            assert len(request) <= limits.max_inputs
            sent = [min(counts[i], per_input) for i in request]
            assert all(0 < t <= per_input for t in sent)
            assert sum(sent) == tokens <= limits.max_request_tokens
        for i, count in enumerate(counts):
            if count == 0:
                assert plan.failed[i][0] == "empty"
            elif count > per_input and overlong == "dead_letter":
                assert plan.failed[i][0] == "too_long"
                assert str(count) in plan.failed[i][1]
            elif count > per_input:
                assert i in plan.truncate
                assert i in placed
            else:
                assert i not in plan.truncate
                assert i in placed


def test_packing_is_dense() -> None:
    """Greedy packing closes a request only when the next input would not fit."""
    rng = random.Random(7)
    for _ in range(200):
        counts, limits = _random_case(rng)
        plan = plan_requests(counts, limits, "truncate")
        per_input = min(limits.max_input_tokens, limits.max_request_tokens)
        for request, tokens, following in zip(
            plan.requests, plan.request_tokens, plan.requests[1:], strict=False
        ):
            nxt = min(counts[following[0]], per_input)
            assert len(request) == limits.max_inputs or tokens + nxt > limits.max_request_tokens


def test_exact_limits() -> None:
    limits = Limits(max_inputs=3, max_input_tokens=10, max_request_tokens=20)
    plan = plan_requests([10, 10, 1, 1, 1, 1, 11], limits, "truncate")
    assert plan.requests == [[0, 1], [2, 3, 4], [5, 6]]
    assert plan.request_tokens == [20, 3, 11]
    assert plan.truncate == {6}
    plan = plan_requests([10, 10, 1, 1, 1, 1, 11], limits, "dead_letter")
    assert plan.requests == [[0, 1], [2, 3, 4], [5]]
    assert plan.failed == {6: ("too_long", "11 tokens, limit 10 per input")}
    # an input limit above the request limit is bounded by the request limit
    plan = plan_requests([50], Limits(5, 100, 30), "truncate")
    assert plan.requests == [[0]]
    assert plan.request_tokens == [30]
    assert plan.truncate == {0}
    assert plan_requests([], limits, "truncate").requests == []
    with pytest.raises(ValueError, match="overlong"):
        plan_requests([1], limits, "drop")


def test_byte_bound_truncation_stays_within_budget() -> None:
    counter = ByteBound()
    rng = random.Random(3)
    alphabet = "ab cdé€😀 \n"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        limit = rng.randint(1, 120)
        cut = counter.truncate(text, limit)
        assert text.startswith(cut)
        assert counter.count([cut])[0] <= limit
        if counter.count([text])[0] <= limit:
            assert cut == text
    assert counter.count(["€"]) == [3]


def test_retry_after_headers() -> None:
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0) == 10
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None


def test_aimd_halves_once_per_burst_and_grows_back() -> None:
    limit = AimdLimit(8)
    epoch = limit.epoch
    limit.on_throttle(epoch)
    limit.on_throttle(epoch)  # same burst: sent before the decrease
    assert limit.limit == 4
    limit.on_throttle(limit.epoch)
    assert limit.limit == 2
    limit.on_success(epoch)  # sent before the decreases: does not count
    limit.on_success(limit.epoch)
    assert limit.limit == 2
    limit.on_success(limit.epoch)
    assert limit.limit == 3
    for _ in range(3 + 4 + 100):
        limit.on_success(limit.epoch)
    assert limit.limit == 8
    for _ in range(10):
        limit.on_throttle(limit.epoch)
    assert limit.limit == 1


def test_parse_response_checks_shape_and_normalises() -> None:
    items: list[dict[str, Any]] = [
        {"index": 1, "embedding": [0.0, 2.0]},
        {"index": 0, "embedding": [3.0, 4.0]},
    ]
    body = {"data": items, "usage": {"prompt_tokens": 7}}
    vectors, tokens = parse_response(body, 2)
    assert tokens == 7
    np.testing.assert_allclose(vectors[0], [0.6, 0.8])
    np.testing.assert_allclose(vectors[1], [0.0, 1.0])
    with pytest.raises(ValueError, match="1 embeddings for 2"):
        parse_response({"data": items[:1]}, 2)
    with pytest.raises(ValueError, match="repeated"):
        parse_response({"data": [items[0], items[0]]}, 2)
    with pytest.raises(ValueError, match="dimensions"):
        parse_response({"data": [{"index": 0, "embedding": [1.0]}, items[0]]}, 2)
    with pytest.raises(ValueError, match="non-finite or zero"):
        parse_response({"data": [{"index": 0, "embedding": [0.0, 0.0]}]}, 1)
    with pytest.raises(ValueError, match="base64"):
        parse_response({"data": [{"index": 0, "embedding": "***"}]}, 1)
