"""What the hot path builds: record payloads, receipts, counters. Pure; no I/O."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from afterwrite.core.collections import QUERIES_COLLECTION
from afterwrite.core.ids import uuid7_str


class Outcome(enum.Enum):
    """What happened to one record. A ``record_*`` call reports SENT, BUFFERED, SPILLED, DROPPED
    or INVALID; FAILED and OVER_CAP are the reasons Redis did not take an entry (the entry was
    then spilled or dropped) and are counted, not returned."""

    SENT = "sent"
    """Redis accepted the entry; a worker will store it."""
    BUFFERED = "buffered"
    """Background mode: in this process's buffer; the flusher sends it within
    ``producer_flush_interval_ms`` or spills it (or, the journal full, drops and counts it).
    Lost only if the process dies without exiting (SIGKILL, OOM kill) before that."""
    SPILLED = "spilled"
    """Written to the local spill journal; replayed into Redis when it can take it again, by
    this process or a later one using the same spill directory. Survives the process dying."""
    DROPPED = "dropped"
    """Neither Redis nor the spill journal could take it (journal full, disabled or unwritable):
    lost, and counted."""
    FAILED = "failed"
    """Reason: Redis was unreachable, too slow, or refused."""
    OVER_CAP = "over_cap"
    """Reason: the kind's stream is over ``AFTERWRITE_STREAM_MAX_ENTRIES``."""
    INVALID = "invalid"
    """The record could not be encoded (e.g. a lone surrogate in a string)."""


class Receipt(str):
    """The event id (a UUIDv7 string, the row's primary key) plus what happened to the record.

    It *is* the id string, so ``event_id = client.record_query(...)`` works as documented;
    ``receipt.outcome`` tells what happened; ``receipt.accepted`` whether the row will arrive.
    ``Receipt(event_id, outcome)`` returns an instance of the outcome's own subclass
    (:data:`RECEIPT_TYPES`), whose ``outcome`` is a class attribute: making one is then the
    plain ``str`` constructor (0.14 µs against 0.53 µs for a Python ``__new__`` setting a slot).
    """

    __slots__ = ()
    outcome: Outcome

    def __new__(cls, event_id: str, outcome: Outcome) -> Receipt:
        return RECEIPT_TYPES[outcome](event_id)

    @property
    def delivered(self) -> bool:
        """Redis has the entry now."""
        return self.outcome is Outcome.SENT

    @property
    def accepted(self) -> bool:
        """The entry is on its way to PostgreSQL: sent, buffered or spilled."""
        return self.outcome in _ACCEPTED


def _receipt_type(outcome: Outcome) -> Callable[[str], Receipt]:
    name = "".join(part.title() for part in outcome.name.split("_")) + "Receipt"
    cls = type(
        name,
        (Receipt,),
        {
            "__slots__": (),
            "__new__": str.__new__,  # one argument, the id; no Python frame on the hot path
            "__module__": __name__,
            "__doc__": f"A :class:`Receipt` whose outcome is {outcome.name}.",
            "outcome": outcome,
        },
    )
    globals()[name] = cls  # importable by name, so receipts pickle
    return cls


RECEIPT_TYPES: dict[Outcome, Callable[[str], Receipt]] = {o: _receipt_type(o) for o in Outcome}
"""Outcome → the Receipt subclass for it (call it with the event id)."""


_ACCEPTED = frozenset({Outcome.SENT, Outcome.BUFFERED, Outcome.SPILLED})

# The counter a call's outcome bumps; BUFFERED ones are counted when the flusher settles them.
_CALL_COUNTER = {
    Outcome.SENT: "sent",
    Outcome.BUFFERED: None,
    Outcome.SPILLED: "spilled",
    Outcome.DROPPED: "dropped",
    Outcome.INVALID: "invalid",
}

COUNTERS = (
    "recorded",
    "sent",
    "spilled",
    "replayed",
    "dropped",
    "invalid",
    "failed",
    "over_cap",
    "buffer_full",
)


class ProducerStats:
    """Counters a producer keeps; read them with ``client.stats.snapshot()``. Thread-safe.

    - ``recorded``: ``record_*`` calls. ``sent``: entries Redis took on their first try.
      ``spilled``: entries written to the spill journal. ``replayed``: journal entries Redis took
      later (also ones an earlier process left). ``dropped``: entries lost, ``invalid``: not
      encodable.
    - Why entries were spilled or dropped: ``failed`` (Redis unreachable, slow or refusing),
      ``over_cap`` (stream over its cap), ``buffer_full`` (background buffer full).
    - ``buffered`` (a gauge, not a counter): entries in the background buffer right now.

    Once nothing is buffered: ``recorded == sent + spilled + dropped + invalid`` and
    ``failed + over_cap + buffer_full == spilled + dropped``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._gauges: dict[str, Callable[[], int]] = {}
        self._recorded_elsewhere: Callable[[], int] | None = None

    def count(self, outcome: Outcome) -> None:
        """One ``record_*`` call ended with ``outcome``."""
        name = _CALL_COUNTER.get(outcome)
        with self._lock:
            self._counts["recorded"] += 1
            if name is not None:
                self._counts[name] += 1

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._counts[name] += n

    def count_buffered_with(self, handed: Callable[[], int]) -> None:
        """BUFFERED calls are not counted here (a lock per call saved on the hot path):
        ``handed()`` (the buffer's own count) is added to ``recorded`` in snapshots."""
        self._recorded_elsewhere = handed

    def gauge(self, name: str, read: Callable[[], int]) -> None:
        """Report ``read()`` (an int) as ``name`` in snapshots."""
        self._gauges[name] = read

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._counts)
        if self._recorded_elsewhere is not None:
            out["recorded"] += self._recorded_elsewhere()
        for name, read in self._gauges.items():
            out[name] = read()
        return out

    def reset_after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's may have been held) and zero counts;
        the child's counters describe the child."""
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0)


class QueryRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The ``query`` kind's payload. Encodes as a msgpack map of column name → value, ``None``
    fields left out: the same entry a dict would give, built by one C call instead of a Python
    test per field (0.5 µs less per ``record_query``). Nothing is validated here: workers
    validate every entry before the database."""

    id: str
    created_at: datetime
    query: str | None = None
    response: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    mode: str | None = None
    model_ids: list[str] | None = None
    response_time_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    retrieval: Mapping[str, Any] | None = None
    metadata: Mapping[str, Any] | None = None
    text_stored: bool | None = None
    """False: recorded with ``store_text=False`` (no ``query`` or ``response``)."""
    redacted_by: list[str] | None = None
    """Set by producer-side redaction (``AFTERWRITE_PRODUCER_REDACT``)."""


def _ids(model_ids: Any) -> list[str]:
    """A sequence of model ids as a list. A string or a mapping is a mistake at the call, not
    data: ``list("gpt-4o")`` would store six one-letter models, ``list({...})`` the keys."""
    if isinstance(model_ids, str | bytes | Mapping) or not isinstance(model_ids, Iterable):
        raise TypeError(
            f'model_ids must be a sequence of strings (e.g. ["gpt-4o"]), '
            f"not {type(model_ids).__name__}"
        )
    return list(model_ids)


def query_record(
    query: str | None,
    *,
    event_id: str | None = None,
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
    text_stored: bool | None = None,
) -> QueryRecord:
    """The ``query`` kind's payload, with a new id and the current time unless given."""
    return QueryRecord(
        id=event_id or uuid7_str(),
        created_at=created_at or datetime.now(UTC),
        query=query,
        response=response,
        user_id=user_id,
        session_id=session_id,
        mode=mode,
        model_ids=model_ids if model_ids is None or type(model_ids) is list else _ids(model_ids),
        response_time_ms=response_time_ms,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        retrieval=retrieval,
        metadata=metadata,
        text_stored=text_stored,
    )


MAX_QUERY_JOB_CHARS = 200_000
"""An embedding job's text is cut here (``afterwrite.models.embedding.MAX_EMBED_TEXT_CHARS``;
the provider policy then fits it to the model's tokens)."""


def query_job(
    event_id: str,
    created_at: datetime,
    query: str,
    user_id: str | None = None,
    session_id: str | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """The embedding job of a query's text in the ``queries`` collection. Its id and doc id are
    the query's event id, so every job made for one query (the producer's, with
    ``record_query(..., embed=True)``, and the worker's, under ``AFTERWRITE_EMBED_QUERIES``;
    both built here) is the same job, byte for byte, and applying it twice changes nothing.
    ``user_id``, ``session_id`` and ``mode`` travel in its metadata."""
    job: dict[str, Any] = {
        "id": event_id,
        "created_at": created_at,
        "collection": QUERIES_COLLECTION,
        "doc_id": event_id,
        "op": "upsert",
        "text": query[:MAX_QUERY_JOB_CHARS],
    }
    meta = {"user_id": user_id, "session_id": session_id, "mode": mode}
    meta = {k: v for k, v in meta.items() if v is not None}
    if meta:
        job["metadata"] = meta
    return job
