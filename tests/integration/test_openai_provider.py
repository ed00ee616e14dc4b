"""The OpenAI provider through the real ``openai`` client against the local fake server."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from afterwrite.embedders.openai_provider import OpenAIEmbedder
from afterwrite.embedders.providers import (
    ProviderConfigError,
    TransientProviderError,
    Vector,
    make_embedder,
)
from afterwrite.embedders.tokens import ByteBound
from tests.fake_openai import FakeEmbeddingServer, openai_settings, running

MODEL = "text-embedding-3-small"


@pytest.fixture
def server() -> Iterator[FakeEmbeddingServer]:
    with running(latency_s=0.02) as s:
        yield s


@pytest.fixture
def made() -> Iterator[list[OpenAIEmbedder]]:
    """Embedders to close after the test (their HTTP connections)."""
    embedders: list[OpenAIEmbedder] = []
    yield embedders
    for e in embedders:
        e.close()


def _embedder(
    server: FakeEmbeddingServer, made: list[OpenAIEmbedder], model: str = MODEL, **settings: Any
) -> OpenAIEmbedder:
    e = OpenAIEmbedder(
        openai_settings(server, **settings), model, backoff_factor_s=0.05, max_backoff_s=0.5
    )
    made.append(e)
    return e


def _texts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "vector",
        "index",
        "query",
        "answer",
        "worker",
        "stream",
        "été",
        "東京",
        "ok",
    ]
    return [
        f"{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for i in range(n)
    ]


def _assert_vectors(
    server: FakeEmbeddingServer, texts: dict[int, str], vectors: dict[int, Vector]
) -> None:
    assert sorted(vectors) == sorted(texts)
    for i, text in texts.items():
        expected = server.vector(text, MODEL, vectors[i].shape[0])
        np.testing.assert_allclose(vectors[i], expected, rtol=1e-5, atol=1e-6)


def test_requests_respect_limits_and_every_input_arrives_once(
    made: list[OpenAIEmbedder],
) -> None:
    with running(max_inputs=40, max_input_tokens=60, max_request_tokens=400) as server:
        e = _embedder(
            server,
            made,
            embedding_max_inputs=40,
            embedding_max_input_tokens=60,
            embedding_max_request_tokens=400,
        )
        texts = _texts(500)
        overlong = {7: "x" * 200, 123: "long " * 80, 499: "é" * 100}
        for i, text in overlong.items():
            texts[i] = text
        result = e.embed_many(texts)
        received = server.requests
    bound = ByteBound()
    overlong.update({i: t for i, t in enumerate(texts) if bound.count([t])[0] > 60})
    assert len(overlong) > 3
    assert result.failed == {}
    assert result.truncated == set(overlong)
    assert all(r.status == 200 for r in received), "no request refused for size"
    assert result.requests == len(received) >= 500 // 40
    assert result.tokens == sum(sum(r.token_counts) for r in received)
    arrived: Counter[str] = Counter()
    for r in received:
        assert len(r.inputs) <= 40
        assert max(r.token_counts) <= 60
        assert sum(r.token_counts) <= 400
        assert max(bound.count(r.inputs)) <= 60
        assert sum(bound.count(r.inputs)) <= 400
        assert r.encoding_format == "base64"
        assert r.dimensions is None
        arrived.update(r.inputs)
    assert sum(arrived.values()) == 500
    whole = {i: t for i, t in enumerate(texts) if i not in overlong}
    assert all(arrived[t] == 1 for t in whole.values())
    cuts = [t for t in arrived if t not in whole.values()]
    assert len(cuts) == len(overlong)
    assert all(any(texts[i].startswith(c) for i in overlong) for c in cuts)
    _assert_vectors(server, whole, {i: result.vectors[i] for i in whole})
    assert {np.linalg.norm(v).round(5) for v in result.vectors.values()} == {1.0}


@pytest.mark.parametrize("header", [{"retry_after_s": 1.0}, {"retry_after_ms": 700}])
def test_429_waits_as_told_and_halves_concurrency(
    server: FakeEmbeddingServer, made: list[OpenAIEmbedder], header: dict[str, Any]
) -> None:
    server.latency_s = 0.1
    e = _embedder(server, made, embedding_max_inputs=10, embedding_concurrency=4)
    texts = _texts(300)
    server.fail_next(429, after=8, **header)
    result = e.embed_many(texts)
    received = server.requests
    _assert_vectors(server, dict(enumerate(texts)), result.vectors)
    assert (result.throttled, result.retries, result.failed) == (1, 1, {})
    assert result.requests == len(received) == 31
    (throttled,) = [r for r in received if r.status == 429]
    wait_s = header.get("retry_after_s") or header["retry_after_ms"] / 1000
    (retried,) = [r for r in received if r.inputs == throttled.inputs and r.status == 200]
    assert retried.arrived_s - throttled.answered_s >= wait_s
    before = [r for r in received if r.arrived_s < throttled.answered_s]
    after = sorted(
        (r for r in received if r.arrived_s > throttled.answered_s), key=lambda r: r.arrived_s
    )
    assert max(r.in_flight for r in before) == 4
    # during the wait only requests sent before the 429 was seen; then at most 2 (half of 4)
    # in flight at once
    assert len([r for r in after if r.arrived_s - throttled.answered_s < wait_s]) <= 3
    late = [r for r in after if r.arrived_s - throttled.answered_s >= wait_s]
    assert max(r.in_flight for r in late[:3]) <= 2
    assert e.concurrency.limit >= 3, "grew back after the throttle"


def test_server_errors_and_timeouts_are_survived(
    server: FakeEmbeddingServer, made: list[OpenAIEmbedder]
) -> None:
    e = _embedder(server, made, embedding_max_inputs=25, embedding_timeout_s=0.5)
    texts = _texts(200)
    server.fail_next(500, times=2)
    server.fail_next(503)
    server.delay_next(2.0)
    server.drop_one_next()
    result = e.embed_many(texts)
    _assert_vectors(server, dict(enumerate(texts)), result.vectors)
    assert result.failed == {}
    assert result.retries == 5
    assert result.throttled == 0
    assert result.requests == 8 + 5 == len(server.requests)


def test_one_refused_input_fails_alone(
    server: FakeEmbeddingServer, made: list[OpenAIEmbedder]
) -> None:
    e = _embedder(server, made, embedding_max_inputs=64)
    texts = _texts(256)
    server.reject(texts[77], "This input was flagged by the content policy.")
    server.reject(texts[200], "Invalid 'input[123]': something about this one.")
    result = e.embed_many(texts)
    assert result.failed == {
        77: ("provider_rejected", "This input was flagged by the content policy."),
        200: ("provider_rejected", "Invalid 'input[123]': something about this one."),
    }
    good = {i: t for i, t in enumerate(texts) if i not in (77, 200)}
    _assert_vectors(server, good, result.vectors)
    # 4 requests, 2 of them refused and bisected down to one input: 6 levels of 2 each
    assert result.requests == 4 + 2 * 2 * 6 == len(server.requests)
    assert result.retries == 0


def test_wrong_key_model_or_parameter_is_a_configuration_error(
    server: FakeEmbeddingServer, made: list[OpenAIEmbedder]
) -> None:
    bad_key = _embedder(server, made, openai_api_key="sk-wrong")
    with pytest.raises(ProviderConfigError, match=r"401.*OPENAI_API_KEY"):
        bad_key.embed_many(_texts(10))
    with pytest.raises(ProviderConfigError, match=r"404.*does not exist"):
        _embedder(server, made, model="no-such-model").embed_many(_texts(10))
    ada = _embedder(server, made, model="text-embedding-ada-002", embedding_dimensions=256)
    with pytest.raises(ProviderConfigError, match="dimensions"):
        ada.embed_many(_texts(100))
    assert [r.status for r in server.requests] == [401, 404, 400], "never bisected"


def test_retries_exhausted_raise_transient_with_nothing_returned(
    server: FakeEmbeddingServer, made: list[OpenAIEmbedder]
) -> None:
    e = _embedder(server, made, embedding_max_inputs=10, embedding_max_retries=2)
    server.fail_next(503, times=1000)
    with pytest.raises(TransientProviderError, match=r"gave up after 2 retries.*503"):
        e.embed_many(_texts(100))
    sent = len(server.requests)
    # the first request to run out of retries ends the call: not all 10 x 3 attempts are made
    assert 3 <= sent < 10 * 3
    server.clear()
    with running() as fresh:
        ok = _embedder(fresh, made, embedding_max_inputs=10)
        assert len(ok.embed_many(_texts(100)).vectors) == 100


def test_dimensions_parameter_and_unnormalised_float_endpoint(made: list[OpenAIEmbedder]) -> None:
    with running(normalize=False, floats_only=True) as server:
        e = _embedder(server, made, embedding_dimensions=256)
        assert e.dimension() == 256
        result = e.embed_many(["hello world", "another text"])
        (request,) = server.requests
    assert request.dimensions == 256
    for i, text in enumerate(["hello world", "another text"]):
        vector = result.vectors[i]
        assert vector.shape == (256,)
        assert vector.dtype == np.float32
        raw = server.vector(text, MODEL, 256)
        np.testing.assert_allclose(vector, raw / np.linalg.norm(raw), rtol=1e-5, atol=1e-6)


def test_compatible_endpoint_dimension_known_after_first_response(
    server: FakeEmbeddingServer, made: list[OpenAIEmbedder]
) -> None:
    e = _embedder(server, made, model="text-embedding-3-large")
    assert e.dimension() is None
    result = e.embed_many(["one", ""])
    assert result.failed == {1: ("empty", "empty text: providers refuse it")}
    assert e.dimension() == 3072 == result.vectors[0].shape[0]


def test_make_embedder_picks_provider_and_caches(server: FakeEmbeddingServer) -> None:
    settings = openai_settings(server)
    e = make_embedder(settings)
    assert isinstance(e, OpenAIEmbedder)
    assert e.model == MODEL
    assert make_embedder(openai_settings(server)) is e
    assert make_embedder(settings, "text-embedding-3-large") is not e
    assert type(make_embedder(settings, "all-MiniLM-L6-v2-onnx-int8")).__name__ == "LocalEmbedder"
    assert len(e.embed_many(["cached"]).vectors) == 1
    e.close()
