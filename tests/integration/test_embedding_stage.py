"""client.embed / delete_embedding → stream → drain → embedding stage → embeddings, against real
Redis and PostgreSQL, with an in-process embedder that counts what it is asked."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
import pytest
import redis

from afterwrite.core.settings import Settings
from afterwrite.embedders.providers import EmbedResult, Limits, TransientProviderError
from afterwrite.embedders.text import content_hash, normalise
from afterwrite.producer import Client
from afterwrite.producer.client import redis_options
from afterwrite.worker.embedding.stage import EmbedStage
from afterwrite.worker.runtime import Runtime

DIM = 8


class CountingEmbedder:
    """Deterministic unit vectors from the text; remembers every input it was given."""

    def __init__(self, model: str, dim: int = DIM) -> None:
        self.model = model
        self.dim = dim
        self.limits = Limits(max_inputs=2048, max_input_tokens=8192, max_request_tokens=300_000)
        self.inputs: list[str] = []
        self.refuse: set[str] = set()
        self.explode: set[str] = set()
        """Texts that make every request containing them fail (like a 500 for that input)."""
        self.down = False
        self.down_after: int | None = None
        """The provider goes away for good after this many calls."""
        self.calls = 0

    def dimension(self) -> int:
        return self.dim

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    def embed_many(self, texts: Sequence[str]) -> EmbedResult:
        self.calls += 1
        if self.down_after is not None and self.calls > self.down_after:
            self.down = True
        if self.down:
            raise TransientProviderError("provider away")
        if self.explode.intersection(texts):
            raise TransientProviderError("HTTP 500 after 6 retries")
        self.inputs.extend(texts)
        vectors: dict[int, npt.NDArray[np.float32]] = {}
        failed: dict[int, tuple[str, str]] = {}
        for i, t in enumerate(texts):
            if t in self.refuse:
                failed[i] = ("provider_rejected", "refused by the provider")
                continue
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            vectors[i] = v / np.linalg.norm(v)
        return EmbedResult(vectors, failed, set(), requests=1)


@pytest.fixture
def embedder() -> CountingEmbedder:
    return CountingEmbedder("test-model")


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings)
    yield rt
    rt.close()


@pytest.fixture
def stage(runtime: Runtime, embedder: CountingEmbedder) -> Iterator[EmbedStage]:
    settings = runtime.settings.model_copy(update={"embedding_model": "test-model"})
    st = EmbedStage(settings, runtime.db.connection, runtime.redis, embedder=lambda s, m: embedder)
    yield st
    st.close()


@pytest.fixture
def client(settings: Settings) -> Client:
    return Client(
        redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings)), settings
    )


def _deliver(runtime: Runtime, stage: EmbedStage) -> dict[str, Any]:
    """Drain the embed stream into embedding_jobs, then run the stage."""
    runtime.drain("embed").run(10)
    return stage.run(30).as_dict()


def _docs(pg: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    cur = pg.cursor(row_factory=psycopg.rows.dict_row)
    return {r["doc_id"]: r for r in cur.execute("SELECT * FROM embeddings ORDER BY doc_id")}


def test_a_document_is_embedded_stored_and_its_job_removed(
    client: Client,
    runtime: Runtime,
    stage: EmbedStage,
    embedder: CountingEmbedder,
    pg: psycopg.Connection[Any],
    rdb: redis.Redis,
) -> None:
    job_id = client.embed("docs", "d1", "  Retrieval  augmented\ngeneration ", {"lang": "en"})
    report = _deliver(runtime, stage)

    docs = _docs(pg)
    row = docs["d1"]
    assert row["model"] == "test-model"
    assert row["dim"] == DIM
    vector = np.frombuffer(row["vector"], dtype="<f4")
    assert vector.shape == (DIM,)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert row["content_hash"] == content_hash("Retrieval augmented generation")
    assert row["text"] == "  Retrieval  augmented\ngeneration "
    assert row["metadata"] == {"lang": "en"}
    assert str(row["job_id"]) == job_id
    assert row["deleted"] is False
    assert row["enqueued_at"] <= row["committed_at"] <= row["embedded_at"]
    assert embedder.inputs == ["Retrieval augmented generation"]
    assert pg.execute("SELECT count(*) FROM embedding_jobs").fetchone() == (0,)
    assert report["embedded"] == 1
    assert report["requests"] == 1
    raw: dict[bytes, bytes] = rdb.hgetall("afterwrite:embed:stats")  # type: ignore[assignment]
    stats = {k.decode(): int(v) for k, v in raw.items()}
    assert stats["jobs"] == 1
    assert stats["embedded"] == 1


def test_unchanged_text_costs_no_provider_call_and_seq_moves_only_on_change(
    client: Client,
    runtime: Runtime,
    stage: EmbedStage,
    embedder: CountingEmbedder,
    pg: psycopg.Connection[Any],
) -> None:
    for i in range(20):
        client.embed("docs", f"d{i}", f"text number {i}")
    _deliver(runtime, stage)
    before = _docs(pg)
    assert len(embedder.inputs) == 20

    # re-send all 20: 14 unchanged (one with different spacing), 6 changed
    for i in range(20):
        text = f"text number {i}" if i < 14 else f"text number {i}, revised"
        if i == 0:
            text = "text   number 0"
        client.embed("docs", f"d{i}", text, {"round": 2})
    report = _deliver(runtime, stage)

    assert sorted(embedder.inputs[20:]) == [f"text number {i}, revised" for i in range(14, 20)]
    assert report["unchanged"] == 14
    assert report["embedded"] == 6
    after = _docs(pg)
    for i in range(20):
        doc = f"d{i}"
        assert after[doc]["metadata"] == {"round": 2}
        # the metadata changed: indexes carry it, so seq moves (the delta picks it up)
        assert after[doc]["seq"] > max(r["seq"] for r in before.values())
        if i < 14:
            assert after[doc]["vector"] == before[doc]["vector"]
        else:
            assert after[doc]["vector"] != before[doc]["vector"]

    # the very same documents again: nothing an index carries changed, seq stays
    for i in range(20):
        text = f"text number {i}" if i < 14 else f"text number {i}, revised"
        if i == 0:
            text = "text   number 0"
        client.embed("docs", f"d{i}", text, {"round": 2})
    _deliver(runtime, stage)
    assert len(embedder.inputs) == 26
    again = _docs(pg)
    assert {d: r["seq"] for d, r in again.items()} == {d: r["seq"] for d, r in after.items()}


def test_a_text_already_embedded_comes_from_the_cache(
    client: Client,
    runtime: Runtime,
    stage: EmbedStage,
    embedder: CountingEmbedder,
    pg: psycopg.Connection[Any],
) -> None:
    client.embed("docs", "a", "shared text")
    client.embed("docs", "b", "shared text")  # same batch: one input
    _deliver(runtime, stage)
    client.embed("faq", "c", "shared   text")  # later batch, other collection: the cache
    report = _deliver(runtime, stage)

    assert embedder.inputs == ["shared text"]
    assert report["cache_hits"] == 1
    docs = _docs(pg)
    assert docs["a"]["vector"] == docs["b"]["vector"] == docs["c"]["vector"]


def test_delete_leaves_a_tombstone_and_the_latest_job_wins(
    client: Client,
    runtime: Runtime,
    stage: EmbedStage,
    embedder: CountingEmbedder,
    pg: psycopg.Connection[Any],
) -> None:
    client.embed("docs", "kept", "stays")
    client.embed("docs", "gone", "goes away")
    _deliver(runtime, stage)
    seq_before = _docs(pg)["gone"]["seq"]

    client.delete_embedding("docs", "gone")
    client.embed("docs", "never", "embedded then deleted in one batch")
    client.delete_embedding("docs", "never")
    report = _deliver(runtime, stage)

    docs = _docs(pg)
    assert docs["gone"]["deleted"] is True
    assert docs["gone"]["vector"] is None
    assert docs["gone"]["seq"] > seq_before
    assert docs["never"]["deleted"] is True
    assert "embedded then deleted in one batch" not in " ".join(embedder.inputs)
    assert docs["kept"]["deleted"] is False
    assert report["deleted"] == 2
    assert report["superseded"] == 1

    client.embed("docs", "gone", "back again")
    _deliver(runtime, stage)
    back = _docs(pg)["gone"]
    assert back["deleted"] is False
    assert back["vector"] is not None


def test_an_older_job_arriving_late_changes_nothing(
    client: Client,
    runtime: Runtime,
    stage: EmbedStage,
    embedder: CountingEmbedder,
    pg: psycopg.Connection[Any],
) -> None:
    old_id = client.embed("docs", "d", "first version")
    client.embed("docs", "d", "second version")
    runtime.drain("embed").run(10)
    # hold the older job back, as if it had been delayed (e.g. replayed from a spill journal)
    held = pg.execute("SELECT * FROM embedding_jobs WHERE id = %s", (old_id,)).fetchone()
    pg.execute("DELETE FROM embedding_jobs WHERE id = %s", (old_id,))
    stage.run(30)
    assert _docs(pg)["d"]["text"] == "second version"

    assert held is not None
    with pg.cursor() as cur:
        cur.execute(
            "INSERT INTO embedding_jobs VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            tuple(psycopg.types.json.Jsonb(v) if isinstance(v, dict) else v for v in held),
        )
    report = stage.run(30).as_dict()
    assert report["superseded"] == 1
    assert _docs(pg)["d"]["text"] == "second version"
    assert embedder.inputs == ["second version"]
    assert pg.execute("SELECT count(*) FROM embedding_jobs").fetchone() == (0,)


def test_an_input_the_provider_refuses_is_dead_lettered_alone(
    client: Client,
    runtime: Runtime,
    stage: EmbedStage,
    embedder: CountingEmbedder,
    pg: psycopg.Connection[Any],
) -> None:
    embedder.refuse.add("bad input")
    for i in range(10):
        client.embed("docs", f"d{i}", "bad input" if i == 3 else f"good {i}")
    report = _deliver(runtime, stage)

    assert report["failed"] == 1
    docs = _docs(pg)
    assert sorted(docs) == sorted(f"d{i}" for i in range(10) if i != 3)
    dead = pg.execute("SELECT kind, reason, error_code, payload FROM dead_letters").fetchall()
    assert len(dead) == 1
    kind, reason, code, payload = dead[0]
    assert (kind, reason, code) == ("embed", "rejected", "provider_rejected")
    assert payload["doc_id"] == "d3"
    assert payload["text"] == "bad input"
    assert pg.execute("SELECT count(*) FROM embedding_jobs").fetchone() == (0,)

    # the provider is fixed: a replay re-enqueues the job, which is then embedded
    from afterwrite.worker.operations.dead_letter_admin import Filter, replay

    embedder.refuse.clear()
    replayed = replay(pg, runtime.redis, runtime.settings, Filter(kind="embed"))
    assert replayed.replayed == 1
    _deliver(runtime, stage)
    assert _docs(pg)["d3"]["text"] == "bad input"
    assert pg.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)


def test_a_provider_outage_writes_nothing_and_the_jobs_wait(
    client: Client,
    runtime: Runtime,
    stage: EmbedStage,
    embedder: CountingEmbedder,
    pg: psycopg.Connection[Any],
) -> None:
    for i in range(5):
        client.embed("docs", f"d{i}", f"text {i}")
    runtime.drain("embed").run(10)
    embedder.down = True
    with pytest.raises(TransientProviderError):
        stage.run(30)
    runtime.db.discard_if_broken()
    assert _docs(pg) == {}
    assert pg.execute("SELECT count(*) FROM embedding_jobs").fetchone() == (5,)
    assert pg.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)

    embedder.down = False
    stage.run(30)
    assert len(_docs(pg)) == 5
    assert pg.execute("SELECT count(*) FROM embedding_jobs").fetchone() == (0,)


def test_an_input_that_always_fails_the_provider_is_isolated_not_blocking(
    client: Client,
    runtime: Runtime,
    stage: EmbedStage,
    embedder: CountingEmbedder,
    pg: psycopg.Connection[Any],
) -> None:
    embedder.explode.add("text 13")
    for i in range(40):
        client.embed("docs", f"d{i}", f"text {i}")
    runtime.drain("embed").run(10)
    report = stage.run(30).as_dict()

    assert report["failed"] == 1
    docs = _docs(pg)
    assert sorted(docs) == sorted(f"d{i}" for i in range(40) if i != 13)
    dead = pg.execute("SELECT error_code, payload FROM dead_letters").fetchall()
    assert [(code, payload["doc_id"]) for code, payload in dead] == [("provider_failed", "d13")]
    assert pg.execute("SELECT count(*) FROM embedding_jobs").fetchone() == (0,)
    # bisection, not one request per input
    assert embedder.calls < 20


def test_an_outage_during_isolation_dead_letters_nothing(
    client: Client,
    runtime: Runtime,
    stage: EmbedStage,
    embedder: CountingEmbedder,
    pg: psycopg.Connection[Any],
) -> None:
    embedder.explode.add("text 13")
    embedder.down_after = 4  # the batch fails, the canary answers, then the provider goes away
    for i in range(40):
        client.embed("docs", f"d{i}", f"text {i}")
    runtime.drain("embed").run(10)
    with pytest.raises(TransientProviderError):
        stage.run(30)
    runtime.db.discard_if_broken()
    assert pg.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
    assert pg.execute("SELECT count(*) FROM embedding_jobs").fetchone() == (40,)


def test_after_a_failed_batch_the_next_one_is_smaller(
    client: Client,
    runtime: Runtime,
    embedder: CountingEmbedder,
    pg: psycopg.Connection[Any],
) -> None:
    settings = runtime.settings.model_copy(
        update={"embedding_model": "test-model", "embedding_batch_jobs": 8}
    )
    stage = EmbedStage(
        settings, runtime.db.connection, runtime.redis, embedder=lambda s, m: embedder
    )
    try:
        for i in range(20):
            client.embed("docs", f"d{i}", f"text {i}")
        runtime.drain("embed").run(10)
        embedder.down = True
        for _ in range(2):
            with pytest.raises(TransientProviderError):
                stage.process_batch()
            runtime.db.discard_if_broken()
        embedder.down = False
        counts, _ = stage.process_batch()
        assert counts["jobs"] == 2  # 8 halved twice
        counts, _ = stage.process_batch()
        assert counts["jobs"] == 4  # one success undoes one halving
        counts, _ = stage.process_batch()
        assert counts["jobs"] == 8
    finally:
        stage.close()


def test_vectors_paid_for_survive_a_rolled_back_batch(
    client: Client,
    runtime: Runtime,
    stage: EmbedStage,
    embedder: CountingEmbedder,
    pg: psycopg.Connection[Any],
) -> None:
    for i in range(6):
        client.embed("docs", f"d{i}", f"text {i}")
    runtime.drain("embed").run(10)
    # the provider answers, then the batch fails before it commits (e.g. the connection drops)
    real = stage._apply

    def apply_then_fail(*args: Any) -> None:
        real(*args)
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    stage._apply = apply_then_fail  # type: ignore[method-assign,assignment]
    with pytest.raises(psycopg.OperationalError):
        stage.run(30)
    runtime.db.discard_if_broken()
    assert _docs(pg) == {}
    assert len(embedder.inputs) == 6
    stage._apply = real  # type: ignore[method-assign]

    report = stage.run(30).as_dict()
    assert len(embedder.inputs) == 6  # nothing paid twice
    assert report["cache_hits"] == 6
    assert len(_docs(pg)) == 6


def test_bad_embed_calls_raise_at_the_caller(client: Client) -> None:
    with pytest.raises(ValueError, match="collection"):
        client.embed("../etc", "d", "text")
    with pytest.raises(ValueError, match="doc_id"):
        client.embed("docs", "", "text")
    with pytest.raises(ValueError, match="text"):
        client.embed("docs", "d", "   ")


def test_normalise_collapses_spacing_and_composition() -> None:
    assert normalise(" a\t b\n") == "a b"
    assert normalise("cafe\u0301") == normalise("café")


def test_reembed_moves_a_collection_to_its_new_model(
    client: Client,
    runtime: Runtime,
    stage: EmbedStage,
    embedder: CountingEmbedder,
    pg: psycopg.Connection[Any],
) -> None:
    from afterwrite.worker.embedding.reembed import reembed

    for i in range(30):
        client.embed("docs", f"d{i}", f"document {i % 25}")  # 25 distinct texts
    client.embed("other", "x", "untouched collection")
    _deliver(runtime, stage)
    client.delete_embedding("docs", "d0")
    _deliver(runtime, stage)
    before = _docs(pg)

    new = CountingEmbedder("model-b")
    settings = runtime.settings.model_copy(
        update={"embedding_model": "test-model", "embedding_collection_models": {"docs": "model-b"}}
    )
    seen: list[tuple[int, int]] = []
    report = reembed(
        settings,
        "docs",
        pg,
        embedder=lambda s, m: new,
        progress=lambda done, total: seen.append((done, total)),
    )

    assert report.remaining_before == 29
    assert report.reembedded == 29
    assert report.failed == {}
    assert sorted(new.inputs) == sorted({f"document {i % 25}" for i in range(1, 30)})
    assert seen[-1] == (29, 29)
    after = _docs(pg)
    for doc, row in after.items():
        if doc == "x":
            assert row["model"] == "test-model"
            assert row["seq"] == before[doc]["seq"]
        elif doc == "d0":
            assert row["deleted"] is True
        else:
            assert row["model"] == "model-b"
            assert row["seq"] > before[doc]["seq"]
    # nothing left: a second run does no work
    again = reembed(settings, "docs", pg, embedder=lambda s, m: new)
    assert again.remaining_before == 0
    assert again.reembedded == 0


def test_reembed_after_a_dimensions_change(
    client: Client,
    runtime: Runtime,
    stage: EmbedStage,
    pg: psycopg.Connection[Any],
) -> None:
    from afterwrite.worker.embedding.reembed import reembed

    for i in range(5):
        client.embed("docs", f"d{i}", f"document {i}")
    _deliver(runtime, stage)
    seqs = {d: r["seq"] for d, r in _docs(pg).items()}

    shorter = CountingEmbedder("test-model", dim=4)
    settings = runtime.settings.model_copy(
        update={"embedding_model": "test-model", "embedding_dimensions": 4}
    )
    report = reembed(settings, "docs", pg, embedder=lambda s, m: shorter)
    assert report.reembedded == 5
    assert len(shorter.inputs) == 5  # the 8-dimension cache entries are not 4-dimension ones
    for doc, row in _docs(pg).items():
        assert row["dim"] == 4
        assert len(row["vector"]) == 16
        assert row["seq"] > seqs[doc]
