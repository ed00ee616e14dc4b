"""What history reads return: stored query records, pages of them, scored hits. Pure; no I/O."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class StoredQuery:
    """One ``query_history`` row with every field a record carries (all but the search
    vectors derived from it), as ``record_query`` sent it plus ``ingested_at``."""

    id: str
    """The event id ``record_query`` returned (a UUIDv7 string)."""
    created_at: datetime
    user_id: str | None
    session_id: str | None
    query: str | None
    """None when the record was stored without bodies (``text_stored`` false)."""
    mode: str | None
    model_ids: list[str]
    response: str | None
    response_time_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    retrieval: dict[str, Any] | None
    metadata: dict[str, Any] | None
    text_stored: bool
    """False: recorded without bodies (``store_text=False``); ``query`` and ``response`` None."""
    redacted_by: list[str] | None
    """The redactors that ran on this record (``AFTERWRITE_REDACT``), None when none did."""
    ingested_at: datetime
    """When afterwrite committed the row."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO 8601 strings (UTC, microseconds)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.isoformat() if isinstance(value, datetime) else value
        return out


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(StoredQuery))
"""The columns every history query selects, in :class:`StoredQuery` order (the table's
``metadata`` column is the record's ``metadata``)."""


def record(row: tuple[Any, ...]) -> StoredQuery:
    """The record for a row selected as :data:`COLUMNS` (extra trailing values ignored)."""
    values = list(row[: len(COLUMNS)])
    values[0] = str(values[0])
    if values[6] is None:
        values[6] = []
    return StoredQuery(*values)


@dataclass(frozen=True, slots=True)
class Page:
    """One page of records and the cursor of the next one (``None``: this was the last)."""

    items: list[StoredQuery]
    next_cursor: str | None

    def __iter__(self) -> Any:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True, slots=True)
class Hit:
    """A record found by ``search_text`` (score: PostgreSQL's ``ts_rank_cd``) or ``similar``
    (score: cosine similarity of the questions), best first."""

    record: StoredQuery
    score: float
