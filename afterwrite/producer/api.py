"""The ``record_*`` methods, written once for the sync and the asyncio client.

Each method builds the payload (pure) and hands it to ``_record``, which the concrete client
implements: the sync client returns a :class:`Receipt`, the asyncio client a coroutine of one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from afterwrite.core import kinds
from afterwrite.core.collections import check_collection, check_doc_id
from afterwrite.core.ids import uuid7_str
from afterwrite.producer.records import query_job, query_record

if TYPE_CHECKING:
    from afterwrite.core.settings import Settings
    from afterwrite.producer.redact import ProducerRedaction

R = TypeVar("R")


class RecordMethods(ABC, Generic[R]):
    _settings: Settings
    _redact: ProducerRedaction | None = None
    """Set by a client when ``AFTERWRITE_PRODUCER_REDACT`` is on (see producer.redact)."""

    def _init_redaction(self) -> None:
        from afterwrite.producer import redact

        self._redact = redact.for_settings(self._settings)

    def _redacted(self, kind: str, record: Any) -> Any:
        redact = self._redact
        if redact is not None and kind in redact:
            try:
                return redact(kind, record)
            except Exception as exc:
                # never sent raw: the worker dead-letters the stand-in, with no content
                return _Unredactable(type(exc).__name__)
        return record

    def _hand(self, kind: str, event_id: str, record: Any) -> R:
        return self._record(kind, event_id, self._redacted(kind, record))

    @abstractmethod
    def _record(self, kind: str, event_id: str, record: Any) -> R:
        """Encode ``record`` (a dict or a msgspec Struct whose id is ``event_id``) and hand
        it over."""

    def record_query(
        self,
        query: str,
        *,
        response: str | None = None,
        user_id: str | None = None,
        session_id: str | None = None,
        mode: str | None = None,
        model_ids: Sequence[str] | None = None,
        response_time_ms: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        retrieval: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        created_at: datetime | None = None,
        event_id: str | None = None,
        embed: bool = False,
        store_text: bool = True,
    ) -> R:
        """Record one LLM request (kind ``query``). The result is (or resolves to) a Receipt:
        the event id string, with ``.outcome``. Never raises for Redis trouble.

        ``embed=True`` also sends the query's text as an embedding job of the ``queries``
        collection (doc id: the event id), for ``History.similar``: a second stream entry,
        so about twice the cost of the call. ``AFTERWRITE_EMBED_QUERIES=true`` on the workers
        does it for every query instead, off the hot path.

        ``store_text=False``: the query and response bodies are left out here, before Redis
        (and ``embed`` sends no job);
        the row keeps the metadata (models, tokens, latency, user, session) with ``query``
        and ``response`` NULL and ``text_stored`` false."""
        record = query_record(
            query if store_text else None,
            event_id=event_id,
            response=response if store_text else None,
            user_id=user_id,
            session_id=session_id,
            mode=mode,
            model_ids=model_ids,
            response_time_ms=response_time_ms,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            retrieval=retrieval,
            metadata=metadata,
            created_at=created_at,
            text_stored=None if store_text else False,
        )
        if embed and store_text and isinstance(query, str) and query.strip():
            job = query_job(record.id, record.created_at, query, user_id, session_id, mode)
            return self._record_pair(
                "query",
                record.id,
                self._redacted("query", record),
                "embed",
                self._redacted("embed", job),
            )
        if self._redact is None:  # the usual case: no extra call on the hot path
            return self._record("query", record.id, record)
        return self._hand("query", record.id, record)

    def _record_pair(self, kind: str, event_id: str, record: Any, kind2: str, record2: Any) -> R:
        """Hand over ``record``, then ``record2`` (its own id inside); the result is the
        first's. Implemented by the clients; a builder of payloads need not."""
        raise NotImplementedError

    def record(self, kind: str, payload: Mapping[str, Any]) -> R:
        """Record one entry of a registered kind; ``payload`` maps column names to values.

        An ``id`` (UUIDv7) is added when the payload has none. Raises UnknownKindError for a
        kind that is not registered: a programming error, caught in the first test run. An
        application's own kind is known once its module is imported, by the application or,
        on first use here, through ``AFTERWRITE_IMPORTS``.
        """
        if not kinds.is_known(kind):
            kinds.import_kind_modules(self._settings.imports)
            kinds.require(kind)
        record = dict(payload)
        event_id = record.setdefault("id", uuid7_str())
        return self._hand(kind, str(event_id), record)

    def record_metric(
        self,
        name: str,
        value: float,
        tags: Mapping[str, str] | None = None,
        ts: datetime | None = None,
    ) -> R:
        """Record one metric point (kind ``metric``): workers store it and fold it into
        per-minute rollups (count, sum, min, max, quantile sketch). ``ts`` defaults to now.
        Non-finite values and bad names or tags are dead-lettered by the worker."""
        record: dict[str, Any] = {
            "id": uuid7_str(),
            "created_at": ts if ts is not None else datetime.now(UTC),
            "name": name,
            "value": value,
        }
        if tags:
            record["tags"] = dict(tags)
        return self._hand("metric", record["id"], record)

    def embed(
        self,
        collection: str,
        doc_id: str,
        text: str,
        metadata: Mapping[str, Any] | None = None,
    ) -> R:
        """Have ``text`` embedded as document ``doc_id`` of ``collection`` (kind ``embed``).

        Workers embed it with the collection's model, skip the provider when the same text was
        embedded before, and replace the document's previous vector; the collection's index
        finds it within seconds. Jobs apply in the order they were made (a later ``embed`` or
        ``delete_embedding`` of the same document wins). Raises ValueError for a bad collection
        name, doc id or empty text (programming errors); never for Redis trouble.
        """
        check_collection(collection)
        check_doc_id(doc_id)
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text must be a non-empty string")
        record: dict[str, Any] = {
            "id": uuid7_str(),
            "created_at": datetime.now(UTC),
            "collection": collection,
            "doc_id": doc_id,
            "op": "upsert",
            "text": text,
        }
        if metadata is not None:
            record["metadata"] = dict(metadata)
        return self._hand("embed", record["id"], record)

    def delete_embedding(self, collection: str, doc_id: str) -> R:
        """Remove document ``doc_id`` from ``collection``: it leaves search results at once
        (a tombstone) and the next index build."""
        check_collection(collection)
        check_doc_id(doc_id)
        record: dict[str, Any] = {
            "id": uuid7_str(),
            "created_at": datetime.now(UTC),
            "collection": collection,
            "doc_id": doc_id,
            "op": "delete",
        }
        return self._record("embed", record["id"], record)


class _Unredactable:
    """Stands in for a record a producer-side redactor failed on: the wire encoder refuses it,
    so the client sends the unencodable stand-in (dead-lettered by the worker) holding only
    this text, never the record."""

    def __init__(self, error: str) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"<record withheld: the producer's redactor raised {self.error}>"
