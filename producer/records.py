"""What the hot path builds: record payloads, receipts, counters. Pure; no I/O."""

from __future__ import annotations

import enum
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from afterwrite.ids import uuid7_str


class Outcome(enum.Enum):
    SENT = "sent"
    """Redis accepted the entry; a worker will store it."""
    FAILED = "failed"
    """Redis was unreachable, too slow, or refused; the record was not handed over."""
    OVER_CAP = "over_cap"
    """The kind's stream is over ``AFTERWRITE_STREAM_MAX_ENTRIES``; the record was not added."""
    INVALID = "invalid"
    """The record could not be encoded (e.g. a lone surrogate in a string)."""


class Receipt(str):
    """The event id (a UUIDv7 string, the row's primary key) plus what happened to the record.

    It *is* the id string, so ``event_id = client.record_query(...)`` works as documented;
    ``receipt.outcome`` / ``receipt.delivered`` tell whether Redis took it.
    """

    __slots__ = ("outcome",)
    outcome: Outcome

    def __new__(cls, event_id: str, outcome: Outcome) -> Receipt:
        self = super().__new__(cls, event_id)
        self.outcome = outcome
        return self

    @property
    def delivered(self) -> bool:
        return self.outcome is Outcome.SENT


@dataclass
class ProducerStats:
    """Counters a producer keeps; read them with ``client.stats.snapshot()``."""

    sent: int = 0
    failed: int = 0
    over_cap: int = 0
    invalid: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, outcome: Outcome) -> None:
        with self._lock:
            name = outcome.value
            setattr(self, name, getattr(self, name) + 1)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {o.value: getattr(self, o.value) for o in Outcome}


def query_record(
    query: str,
    *,
    event_id: str | None,
    response: str | None,
    user_id: str | None,
    session_id: str | None,
    mode: str | None,
    model_ids: Sequence[str] | None,
    response_time_ms: float | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    retrieval: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    created_at: datetime | None,
) -> dict[str, Any]:
    """The ``query`` kind's payload: column name → value. ``None`` values are left out."""
    record: dict[str, Any] = {
        "id": event_id or uuid7_str(),
        "created_at": created_at or datetime.now(UTC),
        "query": query,
    }
    optional: dict[str, Any] = {
        "response": response,
        "user_id": user_id,
        "session_id": session_id,
        "mode": mode,
        "model_ids": list(model_ids) if model_ids is not None else None,
        "response_time_ms": response_time_ms,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "retrieval": retrieval,
        "metadata": metadata,
    }
    record.update((k, v) for k, v in optional.items() if v is not None)
    return record
