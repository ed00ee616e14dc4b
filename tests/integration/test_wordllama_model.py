"""The opt-in offline model (``AFTERWRITE_LOCAL_MODEL=wordllama-l2-supercat-256``): the files
of the installed ``wordllama`` wheel, through the real embedding stage into PostgreSQL."""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import redis

from afterwrite.core.errors import SettingsError
from afterwrite.core.settings import Settings, load_settings
from afterwrite.embedders.providers import (
    LOCAL_MODEL_ID,
    WORDLLAMA_MODEL_ID,
    ProviderConfigError,
    make_embedder,
)
from afterwrite.embedders.wordllama_model import (
    DIMENSION,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    WordLlamaEmbedder,
    package_dir,
)
from afterwrite.producer import Client
from afterwrite.producer.client import redis_options
from afterwrite.readers.index_reader import IndexReader
from afterwrite.worker.embedding.stage import EmbedStage
from afterwrite.worker.index import jobs
from afterwrite.worker.runtime import Runtime
from benchmarks.offline_models import PARAPHRASES, paraphrase_scores
from tests.helpers import in_forked_child
from tests.integration.test_local_model import tampered

TEXTS = ["How do I reset my password?", "ünïcødé 東京", "tiny", "a longer sentence " * 40]


@pytest.fixture(scope="module")
def embedder() -> WordLlamaEmbedder:
    e = WordLlamaEmbedder(load_settings({}))
    e.load()
    return e


def test_vectors_are_wordllamas_own(embedder: WordLlamaEmbedder, tmp_path: Path) -> None:
    # imported here only (it configures the root logger); untyped: Any
    wordllama = importlib.import_module("wordllama")

    result = embedder.embed_many(TEXTS)
    assert embedder.model == WORDLLAMA_MODEL_ID != LOCAL_MODEL_ID
    assert embedder.dimension() == DIMENSION == 256
    assert result.failed == {}
    assert result.truncated == set()
    assert result.tokens == sum(embedder.count_tokens(TEXTS))
    ours = np.stack([result.vectors[i] for i in range(len(TEXTS))])
    assert ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # WordLlama.load finds the bundled tokenizer only in a cache dir's tokenizers/ folder
    (tmp_path / "tokenizers").mkdir()
    shutil.copy(package_dir() / TOKENIZER_FILE, tmp_path / "tokenizers")
    reference = wordllama.WordLlama.load(cache_dir=tmp_path, disable_download=True, dim=DIMENSION)
    np.testing.assert_allclose(ours, reference.embed(TEXTS, norm=True), atol=1e-6)


def test_paraphrases_rank_above_unrelated_pairs(embedder: WordLlamaEmbedder) -> None:
    scores = paraphrase_scores(embedder)
    assert scores["min_related"] - scores["max_unrelated"] > 0.15, scores
    questions = embedder.embed_many([p[0] for p in PARAPHRASES]).vectors
    answers = embedder.embed_many([p[1] for p in PARAPHRASES]).vectors
    for k in range(len(PARAPHRASES)):
        best = max(range(len(PARAPHRASES)), key=lambda j: float(questions[k] @ answers[j]))
        assert best == k, PARAPHRASES[k]


def test_empty_and_overlong_inputs_follow_the_policy() -> None:
    settings = load_settings({}, embedding_max_input_tokens=8)
    long_text = " ".join(["word"] * 20)
    cut = WordLlamaEmbedder(settings).embed_many([long_text, "ok", ""])
    assert cut.truncated == {0}
    assert cut.failed == {2: ("empty", "empty text: providers refuse it")}
    prefix = WordLlamaEmbedder(settings).embed_many([" ".join(["word"] * 8)]).vectors[0]
    np.testing.assert_allclose(cut.vectors[0], prefix, atol=1e-6)
    strict = settings.model_copy(update={"embedding_overlong": "dead_letter"})
    refused = WordLlamaEmbedder(strict).embed_many([long_text, "ok"])
    assert refused.failed == {0: ("too_long", "20 tokens, limit 8 per input")}
    assert sorted(refused.vectors) == [1]


def test_a_damaged_weights_or_tokenizer_file_is_refused(tmp_path: Path) -> None:
    settings = load_settings({})
    weights = tampered(package_dir() / WEIGHTS_FILE, tmp_path / "weights.safetensors")
    with pytest.raises(ProviderConfigError, match=f"{weights}.*sha256"):
        WordLlamaEmbedder(settings, weights_path=weights).embed_many(["x"])
    tokenizer = tampered(package_dir() / TOKENIZER_FILE, tmp_path / "tokenizer.json")
    with pytest.raises(ProviderConfigError, match=f"{tokenizer}.*sha256"):
        WordLlamaEmbedder(settings, tokenizer_path=tokenizer).load()
    # another model's file in its place: not the pinned version either
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not a table")
    with pytest.raises(ProviderConfigError, match=f"{other}.*sha256"):
        WordLlamaEmbedder(settings, weights_path=other).load()
    intact = tmp_path / "intact.safetensors"
    shutil.copyfile(package_dir() / WEIGHTS_FILE, intact)
    assert WordLlamaEmbedder(settings, weights_path=intact).load() > 0


def test_a_bad_local_model_is_a_settings_error_naming_the_choices() -> None:
    with pytest.raises(SettingsError, match="AFTERWRITE_LOCAL_MODEL") as caught:
        load_settings({"AFTERWRITE_LOCAL_MODEL": "wordllama"})
    assert WORDLLAMA_MODEL_ID in str(caught.value)
    assert LOCAL_MODEL_ID in str(caught.value)
    chosen = load_settings({"AFTERWRITE_LOCAL_MODEL": WORDLLAMA_MODEL_ID})
    assert chosen.collection_model("docs") == WORDLLAMA_MODEL_ID
    assert load_settings({}).collection_model("docs") == LOCAL_MODEL_ID  # the default
    assert type(make_embedder(chosen)) is WordLlamaEmbedder


def test_a_forked_child_reads_its_own_copy(embedder: WordLlamaEmbedder) -> None:
    expected = embedder.embed_many([TEXTS[0]]).vectors[0]

    def child() -> bytes:
        vector = embedder.embed_many([TEXTS[0]]).vectors[0]
        loaded = embedder._loaded
        own = loaded is not None and loaded.pid == os.getpid()
        return bytes([own]) + vector.tobytes()

    data = in_forked_child(child)
    assert data[0] == 1, "the child used its parent's tables"
    np.testing.assert_allclose(np.frombuffer(data[1:], dtype=np.float32), expected, atol=1e-6)


@pytest.fixture
def runtime(settings: Settings, tmp_path: Path) -> Iterator[Runtime]:
    rt = Runtime(
        settings.model_copy(
            update={
                "embedding_provider": "local",
                "local_model": WORDLLAMA_MODEL_ID,
                "index_dir": tmp_path / "indexes",
            }
        )
    )
    yield rt
    rt.close()


def test_documents_are_embedded_offline_into_postgresql_and_searched(
    runtime: Runtime, settings: Settings, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    client = Client(
        redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings)), settings
    )
    client.embed("docs", "d1", "How do I reset my password?")
    client.embed("docs", "d2", "I forgot my password, how can I change it?")
    client.embed("docs", "d3", "Invoices are issued on the first day of each month.")
    runtime.drain("embed").run(10)
    stage = EmbedStage(runtime.settings, runtime.db.connection, runtime.redis)  # the real one
    try:
        report = stage.run(30).as_dict()
    finally:
        stage.close()
    assert report["embedded"] == 3
    cur = pg.cursor(row_factory=psycopg.rows.dict_row)
    rows = {r["doc_id"]: r for r in cur.execute("SELECT * FROM embeddings ORDER BY doc_id")}
    assert {r["model"] for r in rows.values()} == {WORDLLAMA_MODEL_ID}
    assert {r["dim"] for r in rows.values()} == {256}
    v = {d: np.frombuffer(r["vector"], dtype="<f4") for d, r in rows.items()}
    assert float(v["d1"] @ v["d2"]) > float(v["d1"] @ v["d3"])
    # the index is built of 256-dimension vectors; a reader with the default model setting
    # embeds the query with the model the index was built with
    built = jobs.rebuild(runtime.settings, "docs")
    assert (built["status"], built["model"], built["dim"]) == ("published", WORDLLAMA_MODEL_ID, 256)
    reader = IndexReader(
        "docs", settings=settings.model_copy(update={"index_dir": tmp_path / "indexes"})
    )
    hits = reader.search("I can't remember my password", k=3)
    assert {h.doc_id for h in hits[:2]} == {"d1", "d2"}
