"""The opt-in offline model: WordLlama ``l2_supercat`` at 256 dimensions, static token vectors.

``AFTERWRITE_LOCAL_MODEL=wordllama-l2-supercat-256``. A text's vector is the mean of its
tokens' rows in a 32,000 x 256 table (Llama-2 tokenizer, no special tokens), L2-normalised:
no network, no attention, no onnxruntime, so it embeds hundreds of times faster than MiniLM
on a CPU, and retrieves worse (README, "The offline models", has both measured).

Both files come inside the ``wordllama`` wheel (``weights/l2_supercat_256.safetensors`` and
``tokenizers/l2_supercat_tokenizer_config.json``) and are verified against pinned sha256
digests when loaded; a mismatch is a :class:`ProviderConfigError` naming the file. The package
is located, never imported: importing it configures the root logger (``logging.basicConfig``)
and its ``WordLlama.load`` looks for the tokenizer in the wrong folder, then tries Hugging
Face. Its embedding is reproduced here (token lookup, ids clipped to the table, mean over the
tokens, unit norm) and checked against ``WordLlamaInference.embed(norm=True)`` in the tests.

Loading is lazy and per process, as for MiniLM: a forked child (Celery prefork) reads its own
copy rather than use its parent's tokenizer, whose thread pool did not survive the fork.
There is no position limit: ``limits.max_input_tokens`` is ``embedding_max_input_tokens``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from afterwrite.embedders.local import LazyLoaded, verified
from afterwrite.embedders.providers import (
    WORDLLAMA_MODEL_ID,
    EmbedResult,
    Limits,
    ProviderConfigError,
    plan_requests,
    unit_rows,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from afterwrite.core.settings import Settings

DIMENSION = 256
WEIGHTS_FILE = "weights/l2_supercat_256.safetensors"
WEIGHTS_SHA256 = "64b47a2dc493cb8e85944076601189739852d7b64e0e1eedcb1937a251cd9fd5"
TOKENIZER_FILE = "tokenizers/l2_supercat_tokenizer_config.json"
TOKENIZER_SHA256 = "93248f2a9ec36c7b35f700a033d5f36228aae48db61aee31007fa49062cdeb68"
TENSOR_KEY = "embedding.weight"
CHUNK_TOKENS = 1 << 16
"""Tokens looked up at once: bounds the (tokens x 256) float32 gather to 64 MiB."""


def package_dir() -> Path:
    """The installed ``wordllama`` package's folder, found without importing it."""
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise ProviderConfigError(
            f"the local model {WORDLLAMA_MODEL_ID} needs the package wordllama "
            "(pip install wordllama), or set AFTERWRITE_LOCAL_MODEL=all-MiniLM-L6-v2-onnx-int8"
        )
    return Path(next(iter(spec.submodule_search_locations)))


class _Loaded:
    """The token table and tokenizer, owned by the process that read them."""

    def __init__(self, weights_path: Path, tokenizer_path: Path) -> None:
        from safetensors import safe_open
        from tokenizers import Tokenizer

        started = time.perf_counter()
        self.pid = os.getpid()
        self.tokenizer: Tokenizer = Tokenizer.from_file(
            str(verified(tokenizer_path, TOKENIZER_SHA256, "tokenizer file"))
        )
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        weights = verified(weights_path, WEIGHTS_SHA256, "embedding model file")
        try:
            with safe_open(str(weights), framework="np") as f:
                table = f.get_tensor(TENSOR_KEY)
        except Exception as exc:  # safetensors raises its own untyped errors
            raise ProviderConfigError(
                f"embedding model file {weights} does not load: {exc}"
            ) from exc
        self.table: npt.NDArray[np.float32] = np.ascontiguousarray(table, dtype=np.float32)
        if self.table.ndim != 2 or self.table.shape[1] != DIMENSION:
            raise ProviderConfigError(
                f"embedding model file {weights} holds a {self.table.shape} table, "
                f"not (vocabulary, {DIMENSION})"
            )
        self.load_s = time.perf_counter() - started


class WordLlamaEmbedder(LazyLoaded["_Loaded"]):
    """:class:`~afterwrite.embedders.providers.Embedder` for WordLlama l2_supercat 256.

    Thread-safe; blocking; loads on first use. ``weights_path`` / ``tokenizer_path`` point the
    loader elsewhere (tests).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        weights_path: Path | None = None,
        tokenizer_path: Path | None = None,
    ) -> None:
        self.model = WORDLLAMA_MODEL_ID
        super().__init__()
        self.limits = Limits.of(settings)
        self.overlong = settings.embedding_overlong
        self._weights_path = weights_path
        self._tokenizer_path = tokenizer_path

    def _load(self) -> _Loaded:
        weights, tokenizer = self._weights_path, self._tokenizer_path
        if weights is None or tokenizer is None:
            root = package_dir()
            weights = weights or root / WEIGHTS_FILE
            tokenizer = tokenizer or root / TOKENIZER_FILE
        return _Loaded(weights, tokenizer)

    def dimension(self) -> int:
        return DIMENSION

    def _encode(self, loaded: _Loaded, texts: Sequence[str]) -> list[list[int]]:
        encodings = loaded.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self._encode(self._get(), texts)]

    def embed_many(self, texts: Sequence[str]) -> EmbedResult:
        loaded = self._get()
        encodings = self._encode(loaded, texts)
        # a text of no tokens (empty) fails as ``empty``, as it does with OpenAI
        plan = plan_requests([len(ids) for ids in encodings], self.limits, self.overlong)
        result = EmbedResult(vectors={}, failed=dict(plan.failed), truncated=set(plan.truncate))
        keep = min(self.limits.max_input_tokens, self.limits.max_request_tokens)
        for i in plan.truncate:
            encodings[i] = encodings[i][:keep]
        for request in plan.requests:
            result.requests += 1
            batch: list[int] = []
            tokens = 0
            for i in request:
                batch.append(i)
                tokens += len(encodings[i])
                if tokens >= CHUNK_TOKENS or i == request[-1]:
                    rows = self.pooled(loaded, [encodings[j] for j in batch])
                    result.vectors.update(zip(batch, rows, strict=True))
                    result.tokens += tokens
                    batch, tokens = [], 0
        return result

    @staticmethod
    def pooled(loaded: _Loaded, batch: list[list[int]]) -> npt.NDArray[np.float32]:
        """Unit mean of each text's token rows (every text has at least one token)."""
        lengths = np.fromiter((len(ids) for ids in batch), dtype=np.int64, count=len(batch))
        flat = np.fromiter(
            (t for ids in batch for t in ids), dtype=np.int64, count=int(lengths.sum())
        )
        np.clip(flat, 0, loaded.table.shape[0] - 1, out=flat)  # as wordllama does
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        sums = np.add.reduceat(loaded.table[flat], starts, axis=0)
        return unit_rows(sums / lengths[:, None].astype(np.float32))
