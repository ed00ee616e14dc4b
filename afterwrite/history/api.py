"""``History`` and ``AsyncHistory``: read back what ``record_query`` wrote.

Every method is one indexed statement (see :mod:`afterwrite.history.queries`); pages are
keyset-paginated with opaque cursors. Reads see committed rows only: a record appears once a
worker stored it (write-behind: usually within a second or two of ``record_query``).

``similar`` searches the ``queries`` collection's vector index (``IndexReader``; numpy, FAISS
and the embedding model load on its first call, not before), then reads the records.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Self, TypeVar

from afterwrite.core.collections import QUERIES_COLLECTION
from afterwrite.history import queries
from afterwrite.history.connections import AsyncPool, Pool
from afterwrite.history.records import Hit, Page, StoredQuery

if TYPE_CHECKING:
    from afterwrite.core.settings import Settings
    from afterwrite.readers.index_reader import IndexReader

P = TypeVar("P", Pool, AsyncPool)

CONVERSATION_LIMIT = 500
"""Records per page of ``conversation`` unless told otherwise."""


class _Similar:
    """The ``queries`` collection's reader, made on first use; shared by both clients."""

    def __init__(self, settings: Settings | None, index_dir: str | Path | None) -> None:
        self._settings = settings
        self._index_dir = index_dir
        self._reader: IndexReader | None = None
        self._lock = threading.Lock()

    def candidates(self, text: str, k: int, user_id: str | None) -> list[tuple[str, float]]:
        """(event id, score) pairs, best first. Raises IndexUnavailable before the collection's
        first index exists."""
        queries._limit(k, "k")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text must be a non-empty string")
        with self._lock:
            if self._reader is None:
                from afterwrite.readers.index_reader import IndexReader

                self._reader = IndexReader(
                    QUERIES_COLLECTION, self._index_dir, settings=self._settings
                )
            reader = self._reader
        # With a user: the index's metadata filter, so the k are that user's true nearest.
        where = None if user_id is None else {"user_id": user_id}
        return [(hit.doc_id, hit.score) for hit in reader.search(text, k=k, where=where)]

    @staticmethod
    def plan(candidates: list[tuple[str, float]], user_id: str | None) -> queries.Plan:
        return queries.by_ids([doc for doc, _ in candidates], user_id=user_id)

    @staticmethod
    def hits(candidates: list[tuple[str, float]], records: list[StoredQuery], k: int) -> list[Hit]:
        by_id = {r.id: r for r in records}
        found = [Hit(by_id[doc], score) for doc, score in candidates if doc in by_id]
        return found[:k]


def _database_url(settings: Settings | None) -> tuple[str, Settings]:
    if settings is None:
        from afterwrite.core.settings import load_settings

        settings = load_settings()
    return settings.require_database_url(), settings


class _Reads(Generic[P]):
    """What both clients hold: a connection pool and the ``similar`` reader."""

    _pool_type: Callable[[str, int], P]

    def __init__(
        self,
        database_url: str,
        *,
        settings: Settings | None = None,
        index_dir: str | Path | None = None,
        max_idle_connections: int = 4,
    ) -> None:
        self._pool: P = self._pool_type(database_url, max_idle_connections)
        self._similar = _Similar(settings, index_dir)

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> Self:
        """Configured from ``AFTERWRITE_DATABASE_URL`` (and ``AFTERWRITE_INDEX_DIR`` for
        ``similar``); SettingsError when missing or invalid."""
        url, settings = _database_url(settings)
        return cls(url, settings=settings)


class History(_Reads[Pool]):
    """Reads of ``query_history``. Thread-safe and fork-safe; build one per process and share
    it. Raises ValueError (bad arguments), InvalidCursor, HistoryUnavailable (PostgreSQL away:
    transient) and HistorySchemaMissing (run ``afterwrite migrate``)."""

    _pool_type = Pool

    def recent(
        self,
        user_id: str | None = None,
        *,
        session_id: str | None = None,
        mode: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """Records newest first, filtered by every argument given (``model``: requests that
        model answered; ``since <= created_at < until``). Pass ``page.next_cursor`` back with
        the same arguments for the next page; it is None after the last."""
        plan = queries.recent(
            user_id=user_id,
            session_id=session_id,
            mode=mode,
            model=model,
            since=since,
            until=until,
            limit=limit,
            after=cursor,
        )
        return plan.page(self._pool.fetch(plan.sql, plan.params))

    def conversation(
        self, session_id: str, *, limit: int = CONVERSATION_LIMIT, cursor: str | None = None
    ) -> Page:
        """A session's records in the order they were made (oldest first; records of the same
        instant by event id, which rises per producer process)."""
        plan = queries.conversation(session_id, limit=limit, after=cursor)
        return plan.page(self._pool.fetch(plan.sql, plan.params))

    def get(self, event_id: str) -> StoredQuery | None:
        """The record ``record_query`` returned ``event_id`` for, or None (unknown, or not
        stored yet)."""
        plan = queries.get(event_id)
        if plan is None:
            return None
        items = plan.page(self._pool.fetch(plan.sql, plan.params)).items
        return items[0] if items else None

    def search_text(self, text: str, *, user_id: str | None = None, limit: int = 20) -> list[Hit]:
        """Full-text search over the queries, and over the responses stored while
        ``AFTERWRITE_SEARCH_RESPONSES`` was on (English stemming; web-search syntax: words,
        ``"a phrase"``, ``or``, ``-word``), best match first; a query's words rank above a
        response's."""
        plan = queries.search_text(text, user_id=user_id, limit=limit)
        return plan.hits(self._pool.fetch(plan.sql, plan.params))

    def similar(self, text: str, *, k: int = 10, user_id: str | None = None) -> list[Hit]:
        """Past questions nearest in meaning to ``text`` (cosine similarity), best first, from
        the ``queries`` collection (see ``AFTERWRITE_EMBED_QUERIES``). Raises IndexUnavailable
        until that collection's first index is built."""
        candidates = self._similar.candidates(text, k, user_id)
        if not candidates:
            return []
        plan = self._similar.plan(candidates, user_id)
        records = plan.page(self._pool.fetch(plan.sql, plan.params)).items
        return self._similar.hits(candidates, records, k)

    def close(self) -> None:
        """Close the idle connections (a later read opens new ones)."""
        self._pool.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncHistory(_Reads[AsyncPool]):
    """The asyncio twin of :class:`History` (same methods, awaited). Use it from one event
    loop; ``similar`` runs the embedding and index search in a thread."""

    _pool_type = AsyncPool

    async def recent(
        self,
        user_id: str | None = None,
        *,
        session_id: str | None = None,
        mode: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """See :meth:`History.recent`."""
        plan = queries.recent(
            user_id=user_id,
            session_id=session_id,
            mode=mode,
            model=model,
            since=since,
            until=until,
            limit=limit,
            after=cursor,
        )
        return plan.page(await self._pool.fetch(plan.sql, plan.params))

    async def conversation(
        self, session_id: str, *, limit: int = CONVERSATION_LIMIT, cursor: str | None = None
    ) -> Page:
        """See :meth:`History.conversation`."""
        plan = queries.conversation(session_id, limit=limit, after=cursor)
        return plan.page(await self._pool.fetch(plan.sql, plan.params))

    async def get(self, event_id: str) -> StoredQuery | None:
        """See :meth:`History.get`."""
        plan = queries.get(event_id)
        if plan is None:
            return None
        items = plan.page(await self._pool.fetch(plan.sql, plan.params)).items
        return items[0] if items else None

    async def search_text(
        self, text: str, *, user_id: str | None = None, limit: int = 20
    ) -> list[Hit]:
        """See :meth:`History.search_text`."""
        plan = queries.search_text(text, user_id=user_id, limit=limit)
        return plan.hits(await self._pool.fetch(plan.sql, plan.params))

    async def similar(self, text: str, *, k: int = 10, user_id: str | None = None) -> list[Hit]:
        """See :meth:`History.similar`."""
        candidates = await asyncio.to_thread(self._similar.candidates, text, k, user_id)
        if not candidates:
            return []
        plan = self._similar.plan(candidates, user_id)
        records = plan.page(await self._pool.fetch(plan.sql, plan.params)).items
        return self._similar.hits(candidates, records, k)

    async def close(self) -> None:
        """Close the idle connections."""
        await self._pool.close()

    async def __aenter__(self) -> AsyncHistory:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
