"""The OpenAI embeddings API (or a compatible endpoint) through the official ``openai`` client.

``embed_many`` plans requests with :func:`~afterwrite.embedders.providers.plan_requests` (token
counts from :mod:`afterwrite.embedders.tokens`: exact with an offline tiktoken encoding, else the
UTF-8 byte length, an upper bound), then runs them on up to ``embedding_concurrency`` threads.
The calling thread schedules; each worker thread makes one HTTP attempt and returns what
happened as a value (:class:`_Outcome`), so every retry decision sits in one place:

- 429: retried after ``retry-after-ms`` / ``Retry-After`` (capped at :data:`MAX_WAIT_S`,
  jittered up to +10%; exponential backoff when absent); no new request starts before then,
  and the in-flight limit halves (AIMD: it grows back by one after a window of as many
  successes as the limit). A 429 with code ``insufficient_quota`` is a configuration error.
- 5xx, 408, 409, timeouts, connection errors, and malformed responses (wrong number of
  embeddings, bad indices, undecodable or non-finite vectors): exponential backoff with jitter.
  A malformed response is treated as transient because a proxy or an overloaded server
  produces them; a deterministic one ends, after the retries, as :class:`TransientProviderError`.
- After ``embedding_max_retries`` retries of one request: :class:`TransientProviderError`;
  nothing of the call is returned, requests still queued are not sent.
- 400 / 413 / 422 on a multi-input request: bisected; an input refused on its own is failed
  with ``provider_rejected`` and the provider's message. A 400 naming a parameter other than
  ``input`` (``model``, ``dimensions``, …) is a configuration error, never bisected.
- 401 / 403 / 404 and other 4xx: :class:`ProviderConfigError`.
- A dimension other than ``embedding_dimensions`` (the endpoint ignored it), or one that changes
  between responses: :class:`ProviderConfigError`.

Embeddings are requested as base64 (what the client itself asks for, and 4x smaller than JSON
floats) and decoded straight into float32 arrays; an endpoint answering with float lists works
too. Every vector is re-normalised to unit length (compatible endpoints may not normalise).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from afterwrite.core.backoff import compute_backoff_s
from afterwrite.embedders.providers import (
    EmbedResult,
    Limits,
    ProviderConfigError,
    TransientProviderError,
    Vector,
    plan_requests,
    unit_rows,
)
from afterwrite.embedders.tokens import TokenCounter, counter_for

if TYPE_CHECKING:
    import openai

    from afterwrite.core.settings import Settings

MAX_WAIT_S = 60.0
"""Longest wait honoured from a ``Retry-After`` header."""
KNOWN_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


# --- pure decisions --------------------------------------------------------------------------


def retry_after_s(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """The wait a 429 asks for: ``retry-after-ms``, else ``Retry-After`` (seconds or an
    HTTP date); None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class AimdLimit:
    """Requests allowed in flight: halves on a throttle, +1 after ``limit`` successes.

    Only requests sent since the last decrease (``epoch``) count: a burst of 429s is one
    congestion signal, and successes of requests sent at the old rate do not grow the new one.
    """

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.epoch = 0
        self._successes = 0
        self._lock = threading.Lock()

    def on_success(self, sent_epoch: int) -> None:
        with self._lock:
            if sent_epoch != self.epoch:
                return
            self._successes += 1
            if self._successes >= self.limit:
                self.limit = min(self.maximum, self.limit + 1)
                self._successes = 0

    def on_throttle(self, sent_epoch: int) -> None:
        with self._lock:
            if sent_epoch != self.epoch:
                return
            self.limit = max(1, self.limit // 2)
            self._successes = 0
            self.epoch += 1


# --- one HTTP attempt, as a value ----------------------------------------------------------


@dataclass
class _Outcome:
    kind: str  # "ok" | "throttled" | "transient" | "rejected" | "config"
    detail: str = ""
    vectors: list[Vector] = field(default_factory=list)
    tokens: int = 0
    wait_s: float | None = None


@dataclass
class _Task:
    indices: list[int]
    attempt: int = 0
    not_before: float = 0.0
    epoch: int = 0


def _error_field(exc: openai.APIStatusError, name: str) -> Any:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner.get(name)
    return None


def _message(exc: openai.APIStatusError) -> str:
    message = _error_field(exc, "message")
    return str(message) if message else f"HTTP {exc.status_code}: {exc.message}"


def _decode(item: Any) -> Vector:
    raw = item.get("embedding") if isinstance(item, dict) else None
    if isinstance(raw, str):
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"undecodable base64 embedding: {exc}") from exc
        if len(data) % 4:
            raise ValueError("base64 embedding is not a whole number of float32")
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if isinstance(raw, list):
        return np.asarray(raw, dtype=np.float32)
    raise ValueError(f"embedding is {type(raw).__name__}, not base64 or a list")


def parse_response(body: Any, n_inputs: int) -> tuple[list[Vector], int | None]:
    """Vectors in input order and ``usage.prompt_tokens``; ValueError when malformed."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != n_inputs:
        got = len(data) if isinstance(data, list) else "no"
        raise ValueError(f"{got} embeddings for {n_inputs} inputs")
    vectors: list[Vector | None] = [None] * n_inputs
    for position, item in enumerate(data):
        index = item.get("index", position) if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < n_inputs or vectors[index] is not None:
            raise ValueError(f"bad or repeated embedding index {index!r}")
        vectors[index] = _decode(item)
    dims = {v.shape[0] for v in vectors if v is not None}
    if len(dims) != 1 or 0 in dims:
        raise ValueError(f"inconsistent embedding dimensions {sorted(dims)}")
    matrix = np.stack([v for v in vectors if v is not None])
    if not np.isfinite(matrix).all() or not np.linalg.norm(matrix, axis=1).all():
        raise ValueError("non-finite or zero embedding")
    usage = body.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return list(unit_rows(matrix)), tokens if isinstance(tokens, int) else None


class OpenAIEmbedder:
    """:class:`~afterwrite.embedders.providers.Embedder` for an OpenAI(-compatible) endpoint.

    ``embed_many`` blocks until every request finished or one failed for good; it is
    thread-safe (calls share the AIMD limit) and creates its HTTP client lazily, again in a
    forked child. ``sleep`` / ``clock`` / ``rand`` are injectable; ``backoff_factor_s`` sets
    the first 5xx backoff.
    """

    def __init__(
        self,
        settings: Settings,
        model: str,
        *,
        backoff_factor_s: float = 0.5,
        max_backoff_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rand: random.Random | None = None,
    ) -> None:
        self.model = model
        self.limits = Limits.of(settings)
        self.overlong = settings.embedding_overlong
        self.concurrency = AimdLimit(settings.embedding_concurrency)
        self._settings = settings
        self._dimensions = settings.embedding_dimensions
        self._seen_dimension: int | None = None
        self._max_retries = settings.embedding_max_retries
        self._backoff_factor_s = backoff_factor_s
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self._sleep = sleep
        self._rand = rand or random.Random()
        self._counter: TokenCounter | None = None
        self._client: openai.OpenAI | None = None
        self._client_pid = 0
        self._lock = threading.Lock()

    @property
    def client(self) -> openai.OpenAI:
        """This process's ``openai.OpenAI`` client (``max_retries=0``: retrying is ours)."""
        with self._lock:
            if self._client is None or self._client_pid != os.getpid():
                self._client = self._new_client()
                self._client_pid = os.getpid()
            return self._client

    def _new_client(self) -> openai.OpenAI:
        s = self._settings
        key = s.openai_api_key.get_secret_value() if s.openai_api_key else None
        if key is None and s.openai_base_url is None:
            raise ProviderConfigError(
                f"embedding model {self.model!r} needs OPENAI_API_KEY (or OPENAI_BASE_URL for a "
                "compatible endpoint); unset, use the local model "
                "AFTERWRITE_EMBEDDING_MODEL=all-MiniLM-L6-v2-onnx-int8"
            )
        try:
            import openai
        except ImportError as exc:
            raise ProviderConfigError(f"the openai package is not installed: {exc}") from exc
        return openai.OpenAI(
            # a compatible endpoint without authentication still needs some key in the client
            api_key=key or "unused",
            base_url=s.openai_base_url,
            timeout=s.embedding_timeout_s,
            max_retries=0,
        )

    def close(self) -> None:
        """Close this process's HTTP connections (a later call opens new ones)."""
        with self._lock:
            if self._client is not None and self._client_pid == os.getpid():
                self._client.close()
            self._client = None

    def dimension(self) -> int | None:
        if self._dimensions is not None:
            return self._dimensions
        if self._seen_dimension is not None:
            return self._seen_dimension
        if self._settings.openai_base_url is None:
            return KNOWN_DIMENSIONS.get(self.model)
        return None

    def _tokens(self) -> TokenCounter:
        if self._counter is None:
            self._counter = counter_for(self.model)
        return self._counter

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self._tokens().count(texts)

    # --- the scheduler -------------------------------------------------------------------

    def embed_many(self, texts: Sequence[str]) -> EmbedResult:
        counter = self._tokens()
        plan = plan_requests(counter.count(texts), self.limits, self.overlong)
        per_input = min(self.limits.max_input_tokens, self.limits.max_request_tokens)
        sent = list(texts)
        for i in plan.truncate:
            sent[i] = counter.truncate(sent[i], per_input)
        result = EmbedResult(vectors={}, failed=dict(plan.failed), truncated=set(plan.truncate))
        if not plan.requests:
            return result
        client = self.client
        pending = deque(_Task(indices) for indices in plan.requests)
        in_flight: dict[Future[_Outcome], _Task] = {}
        pause_until = 0.0
        pool = ThreadPoolExecutor(self.concurrency.maximum, thread_name_prefix="embed")
        try:
            while pending or in_flight:
                now = self._clock()
                while pending and len(in_flight) < self.concurrency.limit:
                    ready_at = max(pending[0].not_before, pause_until)
                    if ready_at > now:
                        break
                    task = pending.popleft()
                    task.epoch = self.concurrency.epoch
                    inputs = [sent[i] for i in task.indices]
                    in_flight[pool.submit(self._attempt, client, inputs)] = task
                    result.requests += 1
                if not in_flight:
                    self._sleep(max(0.0, max(pending[0].not_before, pause_until) - now))
                    continue
                timeout = None
                if pending and len(in_flight) < self.concurrency.limit:
                    timeout = max(0.0, max(pending[0].not_before, pause_until) - now)
                done, _ = wait(in_flight, timeout=timeout, return_when=FIRST_COMPLETED)
                for future in done:
                    task = in_flight.pop(future)
                    pause_until = self._handle(future.result(), task, pending, result, pause_until)
        finally:
            pool.shutdown(wait=not in_flight, cancel_futures=True)
        return result

    def _handle(
        self,
        outcome: _Outcome,
        task: _Task,
        pending: deque[_Task],
        result: EmbedResult,
        pause_until: float,
    ) -> float:
        """Apply one attempt's outcome; returns the new pause (no request starts before)."""
        if outcome.kind == "ok":
            self._check_dimension(outcome.vectors[0].shape[0])
            self.concurrency.on_success(task.epoch)
            result.vectors.update(zip(task.indices, outcome.vectors, strict=True))
            result.tokens += outcome.tokens
            return pause_until
        if outcome.kind == "config":
            raise ProviderConfigError(f"embedding model {self.model!r}: {outcome.detail}")
        if outcome.kind == "rejected":
            if len(task.indices) == 1:
                result.failed[task.indices[0]] = ("provider_rejected", outcome.detail)
            else:
                half = len(task.indices) // 2
                pending.appendleft(_Task(task.indices[half:]))
                pending.appendleft(_Task(task.indices[:half]))
            return pause_until
        # throttled or transient: retry this request, if it has retries left
        if task.attempt >= self._max_retries:
            raise TransientProviderError(
                f"embedding model {self.model!r}: gave up after {task.attempt} retries "
                f"({outcome.kind}: {outcome.detail}); retry the batch later"
            )
        task.attempt += 1
        result.retries += 1
        now = self._clock()
        if outcome.kind == "throttled":
            result.throttled += 1
            self.concurrency.on_throttle(task.epoch)
            if outcome.wait_s is not None:
                delay = min(outcome.wait_s, MAX_WAIT_S) * self._rand.uniform(1.0, 1.1)
            else:
                delay = self._backoff(task.attempt, factor_s=1.0)
            pause_until = max(pause_until, now + delay)
            task.not_before = pause_until
            pending.appendleft(task)
        else:
            # to the back: fresh requests need not wait behind this one's backoff
            task.not_before = now + self._backoff(task.attempt, factor_s=self._backoff_factor_s)
            pending.append(task)
        return pause_until

    def _backoff(self, attempt: int, *, factor_s: float) -> float:
        return compute_backoff_s(
            attempt, factor_s=factor_s, max_backoff_s=self._max_backoff_s, rand=self._rand
        )

    def _check_dimension(self, dim: int) -> None:
        expected = self._dimensions or self._seen_dimension
        if expected is not None and dim != expected:
            why = "embedding_dimensions" if self._dimensions else "earlier responses"
            raise ProviderConfigError(
                f"embedding model {self.model!r} returned {dim} dimensions, {expected} expected "
                f"({why}): the endpoint ignores the dimensions parameter or changed model"
            )
        self._seen_dimension = dim

    def _attempt(self, client: openai.OpenAI, inputs: list[str]) -> _Outcome:
        """One HTTP request; never raises (runs in a pool thread)."""
        import openai

        extra: dict[str, Any] = {}
        if self._dimensions is not None:
            extra["dimensions"] = self._dimensions
        try:
            raw = client.embeddings.with_raw_response.create(
                model=self.model, input=inputs, encoding_format="base64", **extra
            )
            body = raw.http_response.json()
        except openai.RateLimitError as exc:
            if _error_field(exc, "code") == "insufficient_quota":
                return _Outcome("config", f"quota exhausted: {_message(exc)}")
            return _Outcome("throttled", _message(exc), wait_s=retry_after_s(exc.response.headers))
        except openai.APIStatusError as exc:
            return _status_outcome(exc)
        except openai.APIConnectionError as exc:  # includes timeouts
            return _Outcome("transient", f"{type(exc).__name__}: {exc}")
        except ValueError as exc:  # the body is not JSON
            return _Outcome("transient", f"malformed response: {exc}")
        try:
            vectors, usage_tokens = parse_response(body, len(inputs))
        except ValueError as exc:
            return _Outcome("transient", f"malformed response: {exc}")
        tokens = usage_tokens if usage_tokens is not None else sum(self.count_tokens(inputs))
        return _Outcome("ok", vectors=vectors, tokens=tokens)


def _status_outcome(exc: openai.APIStatusError) -> _Outcome:
    status = exc.status_code
    message = _message(exc)
    if status in (408, 409) or status >= 500:
        return _Outcome("transient", f"HTTP {status}: {message}")
    if status in (400, 413, 422):
        param = _error_field(exc, "param")
        if param not in (None, "input") and not str(param).startswith("input"):
            return _Outcome("config", f"HTTP {status} on parameter {param!r}: {message}")
        return _Outcome("rejected", message)
    fix = {
        401: "check OPENAI_API_KEY",
        403: "the key may not use this model or endpoint",
        404: "check the model name and OPENAI_BASE_URL",
    }.get(status, "check the endpoint")
    return _Outcome("config", f"HTTP {status}: {message} ({fix})")
