"""Past questions into the ``queries`` collection, for ``History.similar``.

With ``AFTERWRITE_EMBED_QUERIES=true`` the drain of the ``query`` kind calls
:meth:`QueryJobs.enqueue` with every batch's valid rows after the batch committed and before it
acknowledges the entries. Each row becomes an ``embed`` job on the embed stream, exactly what
``record_query(..., embed=True)`` sends (:func:`afterwrite.producer.records.query_job`), so it
takes the existing embedding path: validation and dead letters by the embed drain, dedup by
content hash, provider-sized batches, retries. The job's id and doc id are the query's event
id, so a batch redelivered after a crash (its rows now duplicates) sends the same jobs again and
they change nothing.

Delivery: the jobs are added in one pipelined round trip; if Redis refuses, the error reaches
the drain before its acknowledgement, the entries stay pending and the retry sends the jobs
again (at least once). Not capped by ``AFTERWRITE_STREAM_MAX_ENTRIES``: the rows are already
stored, and the embed stream drains as fast as the query stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from afterwrite.core import wire
from afterwrite.core.settings import Settings
from afterwrite.models.embedding import EMBED_KIND
from afterwrite.models.registry import Kind
from afterwrite.producer.records import query_job

_METADATA = ("user_id", "session_id", "mode")


class QueryJobs:
    """Turns stored query rows into embedding jobs. One per drain; not thread-safe."""

    def __init__(self, conn: redis.Redis, prefix: str, columns: Sequence[str]) -> None:
        self._conn = conn
        self._stream = wire.stream_key(prefix, EMBED_KIND)
        at = {name: i for i, name in enumerate(columns)}
        self._fields = [at[name] for name in ("id", "created_at", "query", *_METADATA)]

    def jobs(self, rows: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """The job of each row with non-blank query text (an embed job needs text)."""
        out = []
        for row in rows:
            event_id, created_at, text, *meta = (row[i] for i in self._fields)
            if isinstance(text, str) and text.strip():
                out.append(query_job(str(event_id), created_at, text, *meta))
        return out

    def enqueue(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """Add the rows' jobs to the embed stream (one round trip); the number added. Raises
        redis errors (the drain then leaves its entries pending)."""
        jobs = self.jobs(rows)
        if jobs:
            pipe = self._conn.pipeline(transaction=False)
            for job in jobs:
                pipe.xadd(self._stream, {wire.PAYLOAD_FIELD: wire.encode(job)})
            pipe.execute()
        return len(jobs)


def for_drain(
    kind: Kind, settings: Settings, conn: redis.Redis, columns: Sequence[str]
) -> QueryJobs | None:
    """What the drain of ``kind`` calls after each commit, or None (not the query kind, or
    ``AFTERWRITE_EMBED_QUERIES`` off)."""
    if kind.name != "query" or not settings.embed_queries:
        return None
    return QueryJobs(conn, settings.stream_prefix, columns)
