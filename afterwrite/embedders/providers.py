"""The embedding provider interface: texts in, unit vectors out, as few requests as allowed.

``make_embedder(settings, model)`` returns an :class:`Embedder` for a model id: an offline model
for :data:`LOCAL_MODEL_ID` or :data:`WORDLLAMA_MODEL_ID`, otherwise the OpenAI embeddings API
(or any compatible endpoint at ``openai_base_url``). ``embed_many`` is all-or-nothing for transient
trouble: it either returns a result in which every input index is in exactly one of
``vectors`` / ``failed``, or raises :class:`TransientProviderError` (write nothing, retry the
whole batch later) or :class:`ProviderConfigError` (stop; the message says what to fix).
Permanent per-input failures (an input too long under the ``dead_letter`` policy, an input the
provider refuses) are values in ``failed``, never exceptions.

Batching is one pure function, :func:`plan_requests`, shared by both providers: requests of at
most ``max_inputs`` inputs and ``max_request_tokens`` tokens, each input at most
``max_input_tokens`` (over it: truncated or failed with ``too_long``, by policy).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from afterwrite.core.errors import ConfigurationError, Error, TransientError
from afterwrite.core.settings import LOCAL_MODELS

if TYPE_CHECKING:
    from afterwrite.core.settings import Settings

LOCAL_MODEL_ID, WORDLLAMA_MODEL_ID = LOCAL_MODELS
"""The default offline model (MiniLM, ONNX) and the opt-in static one (wordllama)."""

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Limits:
    max_inputs: int
    max_input_tokens: int
    max_request_tokens: int

    @classmethod
    def of(cls, settings: Settings, model_max_input_tokens: int | None = None) -> Limits:
        """The settings' limits, the per-input one capped by the model's own when it has one."""
        per_input = settings.embedding_max_input_tokens
        if model_max_input_tokens is not None:
            per_input = min(per_input, model_max_input_tokens)
        return cls(
            max_inputs=settings.embedding_max_inputs,
            max_input_tokens=per_input,
            max_request_tokens=settings.embedding_max_request_tokens,
        )


@dataclass
class EmbedResult:
    vectors: dict[int, Vector]
    """Input index -> float32 vector of shape (dim,), L2-normalised."""
    failed: dict[int, tuple[str, str]]
    """Input index -> (code, detail): permanent failure of that input (dead-letter its job)."""
    truncated: set[int]
    """Inputs embedded after truncation (their vector covers the start of the text only)."""
    requests: int = 0
    """Provider HTTP requests made (local model: forward passes)."""
    tokens: int = 0
    """Tokens sent: the provider's ``usage`` when it reports it, else counted or estimated."""
    retries: int = 0
    throttled: int = 0
    """429 responses seen."""


class ProviderError(Error):
    """Base of the embedding provider errors (each subclass says what a failure means)."""


class TransientProviderError(ProviderError, TransientError):
    """Retries exhausted on 429 / 5xx / timeouts / connection errors (or a malformed
    response): nothing of the batch is returned; write nothing and retry it later."""


class ProviderConfigError(ProviderError, ConfigurationError):
    """Wrong key, model, endpoint, file or missing package: retrying cannot help."""


class Embedder(Protocol):
    model: str
    """The model id recorded with the vectors."""
    limits: Limits

    def dimension(self) -> int | None:
        """The vectors' dimension when known (an OpenAI-compatible endpoint: after its first
        response)."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text as the provider counts them, or an estimate never below it."""
        ...

    def embed_many(self, texts: Sequence[str]) -> EmbedResult:
        """Embed ``texts``; blocks until done. Every index ends up in exactly one of
        ``vectors`` / ``failed``, or the call raises and returns nothing."""
        ...


# --- the batching plan (pure) -------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    requests: list[list[int]]
    """Input indices per request, in input order."""
    truncate: frozenset[int]
    """Inputs over the per-input limit, to be cut to it before sending."""
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)
    """Inputs never sent: ``too_long`` (dead_letter policy) or ``empty``."""
    request_tokens: list[int] = field(default_factory=list)
    """Tokens of each request (after truncation), parallel to ``requests``."""


def plan_requests(token_counts: Sequence[int], limits: Limits, overlong: str) -> Plan:
    """Pack inputs, in order, into requests within ``limits``.

    ``token_counts[i]`` is input i's token count (an upper bound is fine). An input of 0 tokens
    is an empty text, which providers refuse: failed with ``empty``. An input over
    ``max_input_tokens`` (or over ``max_request_tokens``, whichever is smaller) is truncated to
    it (``overlong == "truncate"``) or failed with ``too_long`` (``"dead_letter"``). Greedy
    packing in input order: a request is closed when the next input would break either limit.
    """
    if overlong not in ("truncate", "dead_letter"):
        raise ValueError(f"overlong policy must be 'truncate' or 'dead_letter', not {overlong!r}")
    per_input = min(limits.max_input_tokens, limits.max_request_tokens)
    requests: list[list[int]] = []
    request_tokens: list[int] = []
    truncate: set[int] = set()
    failed: dict[int, tuple[str, str]] = {}
    current: list[int] = []
    current_tokens = 0
    for i, count in enumerate(token_counts):
        if count <= 0:
            failed[i] = ("empty", "empty text: providers refuse it")
            continue
        tokens = count
        if count > per_input:
            if overlong == "dead_letter":
                failed[i] = ("too_long", f"{count} tokens, limit {per_input} per input")
                continue
            truncate.add(i)
            tokens = per_input
        if current and (
            len(current) >= limits.max_inputs or current_tokens + tokens > limits.max_request_tokens
        ):
            requests.append(current)
            request_tokens.append(current_tokens)
            current, current_tokens = [], 0
        current.append(i)
        current_tokens += tokens
    if current:
        requests.append(current)
        request_tokens.append(current_tokens)
    return Plan(requests, frozenset(truncate), failed, request_tokens)


def unit_rows(matrix: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Rows scaled to unit L2 norm, as float32 (a zero row stays zero)."""
    m = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(m, axis=-1, keepdims=True)
    out: npt.NDArray[np.float32] = np.divide(m, norms, out=np.zeros_like(m), where=norms > 0)
    return out


# --- one embedder per (process, model) ----------------------------------------------------


class _Cache:
    """Embedders of this process; emptied in a forked child."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.embedders: dict[tuple[object, ...], Embedder] = {}
        self.inherited: list[Embedder] = []
        """A parent's embedders, kept so that a child never destroys a parent's onnxruntime
        session (its destructor hangs after fork)."""
        self.lock = threading.Lock()


_cache = _Cache()


def _settings_key(settings: Settings, model: str) -> tuple[object, ...]:
    """What shapes an embedder: two settings objects equal here share one instance."""
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    return (
        model,
        settings.openai_base_url,
        key,
        settings.embedding_dimensions,
        settings.embedding_max_inputs,
        settings.embedding_max_input_tokens,
        settings.embedding_max_request_tokens,
        settings.embedding_overlong,
        settings.embedding_concurrency,
        settings.embedding_timeout_s,
        settings.embedding_max_retries,
    )


def make_embedder(settings: Settings, model: str | None = None) -> Embedder:
    """The embedder for ``model`` (default: the settings' default model), cached per process.

    Cheap: nothing is loaded or connected here; the model file, tokenizer or HTTP client load
    on first use, in the process that uses them. A forked child (Celery prefork) never reuses
    its parent's instances: the cache is dropped when ``os.getpid()`` changes, and each
    embedder also checks the pid before touching its session or client.
    """
    if model is None:
        model = settings.embedding_model or settings.collection_model("")
    key = _settings_key(settings, model)
    with _cache.lock:
        if _cache.pid != os.getpid():
            _cache.inherited.extend(_cache.embedders.values())
            _cache.embedders.clear()
            _cache.pid = os.getpid()
        embedder = _cache.embedders.get(key)
        if embedder is None:
            embedder = _new_embedder(settings, model)
            _cache.embedders[key] = embedder
        return embedder


def _new_embedder(settings: Settings, model: str) -> Embedder:
    if model == LOCAL_MODEL_ID:
        from afterwrite.embedders.local import LocalEmbedder

        return LocalEmbedder(settings)
    if model == WORDLLAMA_MODEL_ID:
        from afterwrite.embedders.wordllama_model import WordLlamaEmbedder

        return WordLlamaEmbedder(settings)
    from afterwrite.embedders.openai_provider import OpenAIEmbedder

    return OpenAIEmbedder(settings, model)
