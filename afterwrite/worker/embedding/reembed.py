"""Re-embedding a collection after its model changed (``afterwrite embeddings reembed``).

Walks the collection's live documents whose model differs from the configured one, in id order
and chunks of ``embedding_batch_jobs``, each chunk in its own transaction: cached vectors first,
the provider for the rest, then the rows get the new model, dimension and vector (``seq``
rises, so the next index build sees the change). Resumable: a second run picks up only what is
left. Index builds wait until no live document of the collection has another model, so one
index never mixes dimensions; the old index keeps serving meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from afterwrite.core.collections import check_collection
from afterwrite.core.settings import Settings
from afterwrite.embedders.text import content_hash, normalise
from afterwrite.worker.embedding.stage import (
    STATS_FIELDS,
    EmbedderFactory,
    EmbedStage,
    default_embedder,
    expected_dim,
)

log = logging.getLogger("afterwrite.embedding")

# Another model, or (AFTERWRITE_EMBEDDING_DIMENSIONS changed) another dimension.
_STALE = "(model IS DISTINCT FROM %s OR dim IS DISTINCT FROM coalesce(%s::int, dim))"
_REMAINING = f"""
SELECT count(*) FROM embeddings WHERE collection = %s AND NOT deleted AND {_STALE}
"""
# Read without locks: provider calls never hold rows the embedding stage wants to write.
_CHUNK = f"""
SELECT id, doc_id, text FROM embeddings
WHERE collection = %s AND NOT deleted AND {_STALE} AND id > %s
ORDER BY id LIMIT %s
"""
# Only rows whose text is still the one embedded: a document the stage changed or deleted
# meanwhile keeps what the stage wrote.
_UPDATE = """
UPDATE embeddings e SET model = %s, dim = %s, vector = u.v, content_hash = u.h,
    seq = nextval('embedding_seq'), embedded_at = now()
FROM unnest(%s::bigint[], %s::bytea[], %s::bytea[]) AS u(id, v, h)
WHERE e.id = u.id AND NOT e.deleted AND e.content_hash = u.h
"""


@dataclass
class ReembedReport:
    collection: str
    model: str
    remaining_before: int = 0
    reembedded: int = 0
    cache_hits: int = 0
    requests: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    """doc_id → why the provider refused its text (the document keeps its old vector)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "model": self.model,
            "remaining_before": self.remaining_before,
            "reembedded": self.reembedded,
            "cache_hits": self.cache_hits,
            "requests": self.requests,
            "failed": self.failed,
        }


def remaining(
    conn: psycopg.Connection[Any], collection: str, model: str, dim: int | None = None
) -> int:
    row = conn.execute(_REMAINING, (collection, model, dim)).fetchone()
    return int(row[0]) if row else 0


def reembed(
    settings: Settings,
    collection: str,
    conn: psycopg.Connection[Any],
    *,
    embedder: EmbedderFactory = default_embedder,
    progress: Callable[[int, int], None] | None = None,
) -> ReembedReport:
    """Give every live document of ``collection`` the configured model's vector.

    ``progress(done, total)`` is called after each chunk. ``conn`` must be in autocommit mode
    (provider calls run outside transactions; each chunk's update is one short transaction).
    """
    check_collection(collection)
    model = settings.collection_model(collection)
    dim = expected_dim(settings, model)
    report = ReembedReport(collection, model, remaining(conn, collection, model, dim))
    # The stage's own path to vectors: the cache, provider requests as the provider plans
    # them, each request cached as it returns, failing inputs isolated.
    stage = EmbedStage(settings, lambda: conn, None, embedder=embedder)
    try:
        done = 0
        # Passes over the collection in id order until one changes nothing: a row the stage
        # rewrote while this pass embedded it is picked up by the next pass if still stale.
        while True:
            before = report.reembedded
            after = 0
            while True:
                rows = conn.execute(
                    _CHUNK, (collection, model, dim, after, settings.embedding_batch_jobs)
                ).fetchall()
                if not rows:
                    break
                after = rows[-1][0]
                rows = [r for r in rows if r[1] not in report.failed]
                _chunk(conn, stage, model, rows, report)
                done = report.reembedded
                log.info(
                    "reembed collection=%s model=%s %d/%d",
                    collection,
                    model,
                    done,
                    report.remaining_before,
                    extra={"action": "reembed", "collection": collection, "done": done},
                )
                if progress is not None:
                    progress(min(done, report.remaining_before), report.remaining_before)
            if report.reembedded == before or not remaining(conn, collection, model, dim):
                return report
    finally:
        stage.close()


def _chunk(
    conn: psycopg.Connection[Any],
    stage: EmbedStage,
    model: str,
    rows: list[tuple[Any, ...]],
    report: ReembedReport,
) -> None:
    texts: dict[bytes, str] = {}
    ids: list[tuple[int, bytes]] = []
    doc_of: dict[int, str] = {}
    for row_id, doc_id, text in rows:
        if text is None:  # nothing to re-embed from
            report.failed[doc_id] = "no stored text"
            continue
        norm = normalise(text)
        digest = content_hash(norm)
        texts[digest] = norm
        ids.append((row_id, digest))
        doc_of[row_id] = doc_id
    counts = dict.fromkeys(STATS_FIELDS, 0)
    vectors, refused, cached = stage.vectors_for(conn, model, texts, counts)
    report.cache_hits += cached
    report.requests += counts["requests"]
    done = [(row_id, digest) for row_id, digest in ids if digest in vectors]
    for row_id, digest in ids:
        if digest in refused:
            report.failed[doc_of[row_id]] = ": ".join(refused[digest])
    if done:
        dim = len(vectors[done[0][1]]) // 4
        updated = conn.execute(
            _UPDATE,
            (
                model,
                dim,
                [r for r, _ in done],
                [vectors[d] for _, d in done],
                [d for _, d in done],
            ),
        ).rowcount
        report.reembedded += max(0, updated)
