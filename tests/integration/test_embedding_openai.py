"""The whole embedding path with the real openai client against a local OpenAI-compatible server:
client.embed → stream → drain → embedding stage → provider → embeddings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
import redis

from afterwrite.core.settings import Settings
from afterwrite.producer import Client
from afterwrite.producer.client import redis_options
from afterwrite.worker.runtime import Runtime
from tests.fake_openai import FakeEmbeddingServer, fake_openai, openai_settings

__all__ = ["fake_openai"]  # the fixture, used by name

N = 10_000


@pytest.fixture
def runtime(settings: Settings, fake_openai: FakeEmbeddingServer) -> Iterator[Runtime]:
    s = openai_settings(
        fake_openai,
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        data_dir=settings.data_dir,
        embedding_model="text-embedding-3-small",
    )
    rt = Runtime(s)
    yield rt
    rt.close()


@pytest.fixture
def client(runtime: Runtime) -> Iterator[Client]:
    s = runtime.settings
    c = Client(redis.Redis.from_url(s.require_redis_url(), **redis_options(s)), s)
    yield c
    c.close()


def _deliver(runtime: Runtime) -> None:
    runtime.drain("embed").run(60)
    stage = runtime.embed_stage()
    while stage.run(60).jobs:
        pass


def _texts(round_: int) -> list[str]:
    # 70% of documents keep their text between rounds; 30% change
    return [
        f"document {i}: {'revised ' * round_ if i % 10 < 3 else ''}notes about vector search"
        for i in range(N)
    ]


def test_resending_10k_jobs_calls_the_provider_only_for_changed_texts(
    runtime: Runtime,
    client: Client,
    fake_openai: FakeEmbeddingServer,
    pg: psycopg.Connection[Any],
) -> None:
    for i, text in enumerate(_texts(0)):
        client.embed("docs", f"d{i}", text)
    _deliver(runtime)
    first = fake_openai.requests
    assert sum(len(r.inputs) for r in first) == N
    assert len(first) <= 10  # provider-sized requests, not one per text
    fake_openai.clear()

    for i, text in enumerate(_texts(1)):
        client.embed("docs", f"d{i}", text)
    _deliver(runtime)

    second = fake_openai.requests
    sent = [t for r in second for t in r.inputs]
    changed = {t for i, t in enumerate(_texts(1)) if i % 10 < 3}
    assert len(sent) == len(changed) == 3_000
    assert set(sent) == changed
    for r in second + first:
        assert r.status == 200
        assert len(r.inputs) <= 2048
        assert sum(r.token_counts) <= 300_000
    rows = pg.execute(
        "SELECT count(*), count(DISTINCT vector), min(dim), max(dim), min(model), max(model) "
        "FROM embeddings WHERE NOT deleted"
    ).fetchone()
    assert rows == (N, N, 1536, 1536, "text-embedding-3-small", "text-embedding-3-small")
    # the stored vector is the provider's vector for the current text
    row = pg.execute("SELECT text, vector FROM embeddings WHERE doc_id = 'd1'").fetchone()
    assert row is not None
    expected = fake_openai.vector(row[0], "text-embedding-3-small", 1536)
    stored = np.frombuffer(row[1], dtype="<f4")
    assert float(stored @ (expected / np.linalg.norm(expected))) > 0.9999


def test_429s_and_5xx_are_survived_with_every_vector_stored_once(
    runtime: Runtime,
    client: Client,
    fake_openai: FakeEmbeddingServer,
    pg: psycopg.Connection[Any],
) -> None:
    for i in range(3_000):
        client.embed("docs", f"d{i}", f"text {i}")
    fake_openai.fail_next(429, times=2, retry_after_s=0.2)
    fake_openai.fail_next(503, times=2)
    _deliver(runtime)

    statuses = [r.status for r in fake_openai.requests]
    assert statuses.count(429) == 2
    assert statuses.count(503) == 2
    ok_inputs = [t for r in fake_openai.requests if r.status == 200 for t in r.inputs]
    # every text answered; a request the client gave up on (a slow machine) may be sent again,
    # so the promise checked is the stored rows': each vector once
    assert set(ok_inputs) == {f"text {i}" for i in range(3_000)}
    assert pg.execute("SELECT count(*), count(DISTINCT doc_id) FROM embeddings").fetchone() == (
        3_000,
        3_000,
    )
    raw: dict[bytes, bytes] = runtime.redis.hgetall("afterwrite:embed:stats")  # type: ignore[assignment]
    stats = {k.decode(): int(v) for k, v in raw.items()}
    assert stats["throttled"] == 2
    assert stats["retries"] >= 4
