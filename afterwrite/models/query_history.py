"""``query_history``: one row per LLM request an AI backend served.

Fields follow what multi-model orchestrators and RAG services keep per request: the query and
answer, which models answered, how long it took, what it cost in tokens, and which retrieved
chunks were used. ``id`` is the client's UUIDv7 event id, so redelivered entries collapse onto
one row (``INSERT … ON CONFLICT (id) DO NOTHING``).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, DateTime, Double, Index, Integer, String, Text, Uuid, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from afterwrite.core.errors import PoisonError
from afterwrite.models.base import Base
from afterwrite.models.registry import register_kind


class QueryError(PoisonError, ValueError):
    """A query record that can never be stored (dead-lettered with ``code``)."""


def validate_query(payload: dict[str, Any]) -> None:
    """A query needs its text unless it was recorded without bodies (``text_stored`` false)."""
    if payload.get("query") is None and payload.get("text_stored") is not False:
        raise QueryError("missing_field", "query: required (or record it with store_text=False)")


@register_kind("query", validate=validate_query)
class QueryHistory(Base):
    __tablename__ = "query_history"
    __table_args__ = (
        Index("ix_query_history_user_id_created_at", "user_id", "created_at"),
        Index("ix_query_history_created_at", "created_at"),
        Index("ix_query_history_mode_created_at", "mode", "created_at"),
        # "which requests used model X": containment queries on the JSON array
        Index(
            "ix_query_history_model_ids",
            "model_ids",
            postgresql_using="gin",
            postgresql_ops={"model_ids": "jsonb_path_ops"},
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), info={"not_future": True})
    """When the request happened (client clock; at most AFTERWRITE_MAX_FUTURE_SKEW_S ahead)."""
    user_id: Mapped[str | None] = mapped_column(String(256))
    session_id: Mapped[str | None] = mapped_column(String(256))
    """Session or conversation id."""
    query: Mapped[str | None] = mapped_column(Text)
    """The user's query; NULL when the record was stored without bodies (``store_text=False``,
    ``AFTERWRITE_NO_TEXT_MODES`` / ``_MODELS``)."""
    mode: Mapped[str | None] = mapped_column(String(64))
    """Request mode: e.g. ``chat``, ``rag``, ``agent``, ``compare``."""
    model_ids: Mapped[list[str]] = mapped_column(
        JSONB, server_default=text("'[]'::jsonb"), info={"items": "str"}
    )
    response: Mapped[str | None] = mapped_column(Text)
    response_time_ms: Mapped[float | None] = mapped_column(Double, info={"min": 0})
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, info={"min": 0})
    completion_tokens: Mapped[int | None] = mapped_column(Integer, info={"min": 0})
    retrieval: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    """Retrieval metadata, e.g. ``{"chunks": [...], "top_k": 5}``."""
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB)
    """Free metadata. (``metadata`` is reserved by SQLAlchemy, hence the attribute name.)"""
    text_stored: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    """False: recorded without bodies (``store_text=False`` or ``AFTERWRITE_NO_TEXT_MODES`` /
    ``_MODELS``); ``query`` and ``response`` are NULL, here and in dead letters."""
    redacted_by: Mapped[list[str] | None] = mapped_column(JSONB, info={"items": "str"})
    """The redactors that ran on this record (``["card", "email", …]``), by the producer or the
    worker (``AFTERWRITE_REDACT``); NULL when none did."""
    ingested_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), info={"server_owned": True}
    )
    """When afterwrite committed the row; ``ingested_at - created_at`` is the write-behind lag."""
