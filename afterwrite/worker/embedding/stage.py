"""The embedding stage: stored ``embed`` jobs → vectors in ``embeddings``, as few provider calls
as possible.

Jobs arrive like every kind (stream → drain → ``embedding_jobs``). One batch of this stage, in
one PostgreSQL transaction:

1. take up to ``embedding_batch_jobs`` jobs, oldest first, ``FOR UPDATE SKIP LOCKED`` (several
   workers share the table without taking the same job; a worker that dies mid-batch drops its
   connection, PostgreSQL rolls back and the jobs are free again);
2. keep the latest job per (collection, doc_id) — older ones are superseded — and drop jobs
   older than what the document already shows (``job_id``): redelivered and out-of-order jobs
   change nothing;
3. a document whose normalised text and model are unchanged costs nothing; a text any document
   already had under the same model comes from ``embedding_cache``; only the rest go to the
   provider, each distinct text once, in provider-sized requests
   (``afterwrite.embedders.providers``);
4. upsert vectors and tombstones (``seq`` rises only when a vector or tombstone changes), store
   new cache entries, dead-letter inputs the provider refused for good, delete the batch's jobs;
5. commit; then count what happened in Redis (``<prefix>:embed:stats``) for status and metrics.

A transient provider failure (retries exhausted) rolls the whole batch back: nothing is written,
the jobs wait for the next run. Provider calls happen inside the transaction, so the batch's
``idle_in_transaction_session_timeout`` is raised to cover them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import psycopg
import redis

from afterwrite.core import wire
from afterwrite.core.settings import LOCAL_MODELS, Settings
from afterwrite.embedders.text import content_hash, normalise
from afterwrite.models.embedding import EMBED_KIND
from afterwrite.worker.ingest import dead_letters
from afterwrite.worker.ingest.dead_letters import DeadEntry

if TYPE_CHECKING:
    from afterwrite.embedders.providers import Embedder

log = logging.getLogger("afterwrite.embedding")

STATS_FIELDS = (
    "jobs",
    "superseded",
    "unchanged",
    "cache_hits",
    "embedded",
    "deleted",
    "failed",
    "truncated",
    "requests",
    "inputs",
    "tokens",
    "retries",
    "throttled",
)
"""Counters kept in the Redis hash ``<prefix>:embed:stats`` (cumulative, all workers).
``embedded``: distinct texts the provider embedded; ``cache_hits``: texts found in the cache;
``unchanged``: documents re-sent with the same text (no work)."""

_json = msgspec.json.Encoder()

_TAKE = """
SELECT id, created_at, collection, doc_id, op, text, metadata::text, ingested_at
FROM embedding_jobs ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED
"""
_EXISTING = """
SELECT e.collection, e.doc_id, e.job_id, e.model, e.content_hash, e.deleted
FROM embeddings e
JOIN unnest(%s::text[], %s::text[]) AS k(collection, doc_id) USING (collection, doc_id)
"""
_CACHED = """
SELECT content_hash, vector FROM embedding_cache WHERE model = %s AND content_hash = ANY(%s)
"""
_CACHE_PUT = """
INSERT INTO embedding_cache (model, content_hash, dim, vector)
SELECT %s, h, %s, v FROM unnest(%s::bytea[], %s::bytea[]) AS t(h, v)
ON CONFLICT DO NOTHING
"""
# One statement for vectors and tombstones; every row carries its whole state (an unchanged
# document its cached vector), so whatever a concurrent batch committed meanwhile, the row ends
# up consistent. ``seq`` and ``embedded_at`` move only when the vector, model, text, metadata or
# tombstone changes: index versions and deltas carry each document's text and metadata (what
# search returns and filters on), so a metadata-only update reaches readers through the delta.
_UPSERT = """
INSERT INTO embeddings (collection, doc_id, job_id, deleted, model, dim, content_hash, vector,
                        text, metadata, enqueued_at, committed_at)
SELECT * FROM unnest(%s::text[], %s::text[], %s::uuid[], %s::bool[], %s::text[], %s::int[],
                     %s::bytea[], %s::bytea[], %s::text[], %s::jsonb[], %s::timestamptz[],
                     %s::timestamptz[])
ON CONFLICT (collection, doc_id) DO UPDATE SET
    seq = CASE WHEN {same} THEN embeddings.seq ELSE nextval('embedding_seq') END,
    embedded_at = CASE WHEN {same} THEN embeddings.embedded_at ELSE now() END,
    job_id = EXCLUDED.job_id,
    deleted = EXCLUDED.deleted,
    model = EXCLUDED.model,
    dim = EXCLUDED.dim,
    content_hash = EXCLUDED.content_hash,
    vector = EXCLUDED.vector,
    text = EXCLUDED.text,
    metadata = EXCLUDED.metadata,
    enqueued_at = EXCLUDED.enqueued_at,
    committed_at = EXCLUDED.committed_at
WHERE embeddings.job_id < EXCLUDED.job_id
""".format(
    same="(embeddings.deleted = EXCLUDED.deleted AND embeddings.model IS NOT DISTINCT FROM "
    "EXCLUDED.model AND embeddings.dim IS NOT DISTINCT FROM EXCLUDED.dim "
    "AND embeddings.content_hash IS NOT DISTINCT FROM EXCLUDED.content_hash "
    # two workers embedding the same new text at once may get different vectors for it:
    # whichever lands, a changed vector is a change the index must see
    "AND embeddings.vector IS NOT DISTINCT FROM EXCLUDED.vector "
    "AND embeddings.text IS NOT DISTINCT FROM EXCLUDED.text "
    "AND embeddings.metadata IS NOT DISTINCT FROM EXCLUDED.metadata)"
)
_DONE = "DELETE FROM embedding_jobs WHERE id = ANY(%s)"
MAX_ISOLATED = 3
"""More inputs than this failing alone in one batch means the provider is failing, not them."""
CANARY_TEXT = "afterwrite provider check"
"""Embedded when a request keeps failing, to tell a provider outage from a poison input."""


def embed_time_limit_s(settings: Settings) -> float:
    """How long one embedding task may run (its soft time limit): a batch may wait out every
    retry of a provider request."""
    return settings.drain_budget_s + settings.embedding_timeout_s * (
        settings.embedding_max_retries + 2
    )


def cache_model(settings: Settings, model: str) -> str:
    """The cache's model key: OpenAI's shortened vectors (``AFTERWRITE_EMBEDDING_DIMENSIONS``)
    are another model's vectors."""
    dims = expected_dim(settings, model)
    return model if dims is None else f"{model}@{dims}"


def expected_dim(settings: Settings, model: str) -> int | None:
    """The dimension vectors of ``model`` must have, when the settings fix it."""
    if model in LOCAL_MODELS:  # offline models have their own, fixed dimension
        return None
    return settings.embedding_dimensions


def vector_bytes(vector: np.ndarray[Any, Any]) -> bytes:
    """The stored form: float32 little-endian."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


@dataclass
class Job:
    id: uuid.UUID
    created_at: datetime
    collection: str
    doc_id: str
    op: str
    text: str | None
    metadata: str | None
    """As stored (jsonb text): passed through untouched."""
    ingested_at: datetime

    @property
    def key(self) -> tuple[str, str]:
        return (self.collection, self.doc_id)

    def payload(self) -> dict[str, Any]:
        """The job as its producer sent it (for a dead letter, replayable as is)."""
        out: dict[str, Any] = {
            "id": str(self.id),
            "created_at": self.created_at.isoformat(),
            "collection": self.collection,
            "doc_id": self.doc_id,
            "op": self.op,
        }
        if self.text is not None:
            out["text"] = self.text
        if self.metadata is not None:
            out["metadata"] = json.loads(self.metadata)
        return out


@dataclass
class _Existing:
    job_id: uuid.UUID
    model: str | None
    content_hash: bytes | None
    deleted: bool


@dataclass
class EmbedReport:
    batches: int = 0
    jobs: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATS_FIELDS, 0))
    duration_s: float = 0.0
    max_lag_s: float | None = None
    """Age of the oldest job (since it was enqueued) when its batch committed."""

    def add(self, counts: dict[str, int], lag_s: float | None) -> None:
        self.batches += 1
        self.jobs += counts["jobs"]
        for k, v in counts.items():
            self.counts[k] += v
        if lag_s is not None:
            self.max_lag_s = max(self.max_lag_s or 0.0, lag_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": EMBED_KIND,
            "batches": self.batches,
            **{k: v for k, v in self.counts.items() if v},
            "duration_s": round(self.duration_s, 3),
            "max_lag_s": None if self.max_lag_s is None else round(self.max_lag_s, 3),
        }


EmbedderFactory = Callable[[Settings, str], "Embedder"]


def default_embedder(settings: Settings, model: str) -> Embedder:
    from afterwrite.embedders.providers import make_embedder

    return make_embedder(settings, model)


class EmbedStage:
    """Runs embedding batches for this process. Not thread-safe; one per worker process."""

    def __init__(
        self,
        settings: Settings,
        connect: Callable[[], psycopg.Connection[Any]],
        redis_client: redis.Redis | None,
        *,
        embedder: EmbedderFactory = default_embedder,
        stopping: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._connect = connect
        self._redis = redis_client
        self._embedder = embedder
        self._stopping = stopping
        self._clock = clock
        self._cache_conn: psycopg.Connection[Any] | None = None
        self._embedded_now: set[tuple[str, bytes]] = set()
        self._isolated = 0
        self.touched: set[str] = set()
        """Collections that got vectors or tombstones since the caller last emptied this."""

    def close(self) -> None:
        if self._cache_conn is not None:
            self._cache_conn.close()
            self._cache_conn = None

    # -- the loop ---------------------------------------------------------------------------
    def run(self, budget_s: float) -> EmbedReport:
        """Embed batches until no job is left, the budget is spent or shutdown is asked."""
        started = self._clock()
        report = EmbedReport()
        n = self.settings.embedding_batch_jobs
        while not self._stopping():
            batch_started = self._clock()
            counts, lag_s = self.process_batch()
            if counts["jobs"] == 0:
                break
            report.add(counts, lag_s)
            now = self._clock()
            if counts["jobs"] < n or now - started + (now - batch_started) > budget_s:
                break
        report.duration_s = self._clock() - started
        return report

    # -- one batch --------------------------------------------------------------------------
    def process_batch(self) -> tuple[dict[str, int], float | None]:
        counts = dict.fromkeys(STATS_FIELDS, 0)
        conn = self._connect()
        started = self._clock()
        s = self.settings
        size = self._batch_size()
        try:
            with conn.transaction():
                # Provider calls (with retries) run inside this transaction: it may stay idle
                # for as long as the task may run.
                idle_ms = int((embed_time_limit_s(s) + 60) * 1000)
                conn.execute(f"SET LOCAL idle_in_transaction_session_timeout = {idle_ms}")
                jobs = [Job(*row) for row in conn.execute(_TAKE, (size,))]
                if not jobs:
                    return counts, None
                counts["jobs"] = len(jobs)
                self._apply(conn, jobs, counts)
                conn.execute(_DONE, ([j.id for j in jobs],))
                lag_s = max(0.0, time.time() - min(j.created_at.timestamp() for j in jobs))
        except Exception:
            # The same oldest jobs come first again: halve the next batch each time, so a job
            # that hangs the provider or outlasts the time limit ends up alone in a batch of
            # one, where isolation can dead-letter it.
            self._shrink(+1)
            raise
        self._shrink(-1)
        self._count(counts)
        log.info(
            "embed batch jobs=%d embedded=%d cache_hits=%d unchanged=%d deleted=%d failed=%d "
            "requests=%d %.3fs",
            counts["jobs"],
            counts["embedded"],
            counts["cache_hits"],
            counts["unchanged"],
            counts["deleted"],
            counts["failed"],
            counts["requests"],
            self._clock() - started,
            extra={"action": "embed_batch", **counts},
        )
        return counts, lag_s

    def _apply(
        self, conn: psycopg.Connection[Any], jobs: list[Job], counts: dict[str, int]
    ) -> None:
        self._embedded_now.clear()
        self._isolated = 0
        latest: dict[tuple[str, str], Job] = {}
        for job in jobs:  # oldest first: the last one per document wins
            latest[job.key] = job
        counts["superseded"] = len(jobs) - len(latest)
        existing = self._existing(conn, list(latest))
        live = [
            j for j in latest.values() if j.key not in existing or j.id > existing[j.key].job_id
        ]
        counts["superseded"] += len(latest) - len(live)

        rows: list[_Row] = []
        wanted: dict[str, dict[bytes, str]] = {}  # model -> hash -> normalised text
        upserts: list[tuple[Job, str, bytes]] = []
        unchanged: set[tuple[str, str]] = set()
        for job in live:
            if job.op == "delete":
                rows.append(_Row.tombstone(job))
                counts["deleted"] += 1
                continue
            assert job.text is not None  # the kind's validator guarantees it
            model = self.settings.collection_model(job.collection)
            text = normalise(job.text)
            digest = content_hash(text)
            old = existing.get(job.key)
            if (
                old is not None
                and not old.deleted
                and (old.model, old.content_hash)
                == (
                    model,
                    digest,
                )
            ):
                unchanged.add(job.key)
            wanted.setdefault(model, {})[digest] = text
            upserts.append((job, model, digest))

        vectors: dict[tuple[str, bytes], bytes] = {}
        failed: dict[tuple[str, bytes], tuple[str, str]] = {}
        for model, texts in wanted.items():
            # Unchanged documents take their vector from the cache too: the upsert always
            # writes a whole row, whatever a concurrent batch did to it meanwhile.
            found, refused, _ = self.vectors_for(conn, model, texts, counts)
            vectors.update(((model, d), blob) for d, blob in found.items())
            failed.update(((model, d), why) for d, why in refused.items())

        dead: list[DeadEntry] = []
        for job, model, digest in upserts:
            key = (model, digest)
            if key in failed:
                code, detail = failed[key]
                dead.append(self._dead(job, code, detail))
                continue
            if job.key in unchanged:
                counts["unchanged"] += 1
            elif key not in self._embedded_now:
                counts["cache_hits"] += 1
            blob = vectors[key]
            rows.append(_Row.upsert(job, model, len(blob) // 4, digest, blob))
        self._embedded_now.clear()
        counts["failed"] = len(dead)
        if rows:
            # in key order: concurrent batches touching the same documents cannot deadlock
            rows.sort(key=lambda r: (r.collection, r.doc_id))
            conn.execute(_UPSERT, _columns(rows))
            self.touched.update(r.collection for r in rows)
        dead_letters.add(conn, dead)

    def _cache_model(self, model: str) -> str:
        return cache_model(self.settings, model)

    def vectors_for(
        self,
        conn: psycopg.Connection[Any],
        model: str,
        texts: dict[bytes, str],
        counts: dict[str, int],
    ) -> tuple[dict[bytes, bytes], dict[bytes, tuple[str, str]], int]:
        """Vectors of ``model`` for ``texts`` (content hash → normalised text): the cache
        first, the provider for the rest (see :meth:`_embed`). Returns the vectors and the
        refused texts by hash, and how many came from the cache; provider figures go to
        ``counts``."""
        found = self._cached(conn, self._cache_model(model), list(texts))
        cached = len(found)
        missing = sorted((d, t) for d, t in texts.items() if d not in found)
        vectors: dict[tuple[str, bytes], bytes] = {}
        failed: dict[tuple[str, bytes], tuple[str, str]] = {}
        if missing:
            self._embed(model, missing, vectors, failed, counts)
        found.update((d, blob) for (_, d), blob in vectors.items())
        return found, {d: why for (_, d), why in failed.items()}, cached

    def _embed(
        self,
        model: str,
        missing: Sequence[tuple[bytes, str]],
        vectors: dict[tuple[str, bytes], bytes],
        failed: dict[tuple[str, bytes], tuple[str, str]],
        counts: dict[str, int],
    ) -> None:
        """Embed ``missing`` one provider request at a time (the provider's own plan: inputs
        and tokens per request), storing each request's vectors in the cache at once (own
        connection, autocommit): if this batch later rolls back, a retry finds them there and
        pays the provider nothing again."""
        from afterwrite.embedders.providers import plan_requests

        embedder = self._embedder(self.settings, model)
        texts = [t for _, t in missing]
        plan = plan_requests(
            embedder.count_tokens(texts), embedder.limits, self.settings.embedding_overlong
        )
        for i, why in plan.failed.items():
            failed[(model, missing[i][0])] = why
        for request in plan.requests:
            chunk = [missing[i] for i in request]
            self._embed_chunk(model, chunk, vectors, failed, counts, False)

    def _embed_chunk(
        self,
        model: str,
        chunk: Sequence[tuple[bytes, str]],
        vectors: dict[tuple[str, bytes], bytes],
        failed: dict[tuple[str, bytes], tuple[str, str]],
        counts: dict[str, int],
        isolating: bool,
    ) -> None:
        from afterwrite.embedders.providers import TransientProviderError

        settings = self._quick_settings() if isolating else self.settings
        try:
            result = self._embedder(settings, model).embed_many([t for _, t in chunk])
        except TransientProviderError as exc:
            # The provider may be down or throttling (retry the batch later: raise), or one
            # input may make it fail every time (a 500 for that text only). A known-good input,
            # asked right before each verdict, tells which.
            if not isolating and not self._provider_answers(model):
                raise
            if len(chunk) == 1:
                if self._isolated >= MAX_ISOLATED or not self._provider_answers(model):
                    raise  # not one bad input: the provider is failing; the batch waits
                self._isolated += 1
                failed[(model, chunk[0][0])] = ("provider_failed", str(exc)[:500])
                return
            half = len(chunk) // 2
            for part in (chunk[:half], chunk[half:]):
                self._embed_chunk(model, part, vectors, failed, counts, True)
            return
        counts["requests"] += result.requests
        counts["inputs"] += len(chunk)
        counts["tokens"] += result.tokens
        counts["retries"] += result.retries
        counts["throttled"] += result.throttled
        counts["truncated"] += len(result.truncated)
        new: list[tuple[bytes, bytes]] = []
        for i, (digest, _) in enumerate(chunk):
            if i in result.failed:
                failed[(model, digest)] = result.failed[i]
                continue
            blob = vector_bytes(result.vectors[i])
            vectors[(model, digest)] = blob
            self._embedded_now.add((model, digest))
            new.append((digest, blob))
        counts["embedded"] += len(new)
        if new:
            self._cache_put(model, new)

    def _quick_settings(self) -> Settings:
        """Settings for isolating a failing input: one retry per request, not the full patience
        (bisecting a batch with full retries would outlast the task's time limit)."""
        return self.settings.model_copy(
            update={"embedding_max_retries": min(1, self.settings.embedding_max_retries)}
        )

    def _provider_answers(self, model: str) -> bool:
        from afterwrite.embedders.providers import ProviderError

        try:
            result = self._embedder(self._quick_settings(), model).embed_many([CANARY_TEXT])
        except ProviderError:
            return False
        return 0 in result.vectors

    def _cache_put(self, model: str, new: list[tuple[bytes, bytes]]) -> None:
        new.sort()  # in key order: concurrent inserts of the same texts cannot deadlock
        dim = len(new[0][1]) // 4
        args = (self._cache_model(model), dim, [h for h, _ in new], [b for _, b in new])
        for attempt in (1, 2):
            conn = self._cache_conn
            try:
                if conn is None or conn.closed:
                    conn = self._cache_conn = psycopg.connect(
                        self.settings.require_database_url(),
                        autocommit=True,
                        connect_timeout=10,
                        application_name=f"afterwrite-embed-cache:{os.getpid()}",
                    )
                conn.execute(_CACHE_PUT, args)
                return
            except psycopg.OperationalError:
                self._cache_conn = None
                if attempt == 2:
                    raise

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _existing(
        conn: psycopg.Connection[Any], keys: list[tuple[str, str]]
    ) -> dict[tuple[str, str], _Existing]:
        rows = conn.execute(_EXISTING, ([c for c, _ in keys], [d for _, d in keys]))
        return {(c, d): _Existing(j, m, h, x) for c, d, j, m, h, x in rows}

    @staticmethod
    def _cached(
        conn: psycopg.Connection[Any], model: str, hashes: list[bytes]
    ) -> dict[bytes, bytes]:
        return {bytes(h): bytes(v) for h, v in conn.execute(_CACHED, (model, hashes))}

    @staticmethod
    def _dead(job: Job, code: str, detail: str) -> DeadEntry:
        payload = job.payload()
        return DeadEntry(
            kind=EMBED_KIND,
            entry_id="",
            payload_raw=wire.encode(payload),
            payload=payload,
            reason="rejected",
            error_code=code,
            detail=detail,
        )

    def _shrink_key(self) -> str:
        return f"{self.settings.stream_prefix}:embed:shrink"

    def _batch_size(self) -> int:
        """``embedding_batch_jobs``, halved once per recent failed batch (shared by workers)."""
        level = 0
        if self._redis is not None:
            with contextlib.suppress(redis.RedisError, ValueError, TypeError):
                level = int(self._redis.get(self._shrink_key()) or 0)
        return max(1, self.settings.embedding_batch_jobs >> max(0, min(level, 30)))

    def _shrink(self, step: int) -> None:
        if self._redis is None:
            return
        key = self._shrink_key()
        with contextlib.suppress(redis.RedisError):
            if step > 0:
                pipe = self._redis.pipeline()
                pipe.incr(key)
                pipe.expire(key, 3600)
                pipe.execute()
            # one success undoes one halving; the key goes away at zero
            elif self._redis.exists(key) and int(self._redis.decr(key)) <= 0:
                self._redis.delete(key)

    def _count(self, counts: dict[str, int]) -> None:
        if self._redis is None:
            return
        key = f"{self.settings.stream_prefix}:embed:stats"
        try:
            pipe = self._redis.pipeline(transaction=False)
            for name, value in counts.items():
                if value:
                    pipe.hincrby(key, name, value)
            pipe.execute()
        except redis.RedisError as exc:  # counters are best effort; the batch is committed
            log.warning("could not update %s: %s", key, exc)


@dataclass(frozen=True)
class _Row:
    collection: str
    doc_id: str
    job_id: uuid.UUID
    deleted: bool
    model: str | None
    dim: int | None
    content_hash: bytes | None
    vector: bytes | None
    text: str | None
    metadata: str | None
    enqueued_at: datetime
    committed_at: datetime

    @classmethod
    def upsert(
        cls, job: Job, model: str, dim: int | None, digest: bytes, vector: bytes | None
    ) -> _Row:
        return cls(
            job.collection,
            job.doc_id,
            job.id,
            False,
            model,
            dim,
            digest,
            vector,
            job.text,
            job.metadata,
            job.created_at,
            job.ingested_at,
        )

    @classmethod
    def tombstone(cls, job: Job) -> _Row:
        return cls(
            job.collection,
            job.doc_id,
            job.id,
            True,
            None,
            None,
            None,
            None,
            None,
            None,
            job.created_at,
            job.ingested_at,
        )


def _columns(rows: Sequence[_Row]) -> tuple[list[Any], ...]:
    return tuple(list(col) for col in zip(*(tuple(r.__dict__.values()) for r in rows), strict=True))
