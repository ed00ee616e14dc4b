"""``erasure_log``: one row per ``afterwrite erase`` run: what was erased, per store.

It holds the user id's sha256 (``user_hash``) and counts, never the id or the data, so the
log itself can be kept as evidence that a request was carried out
(``AFTERWRITE_ERASURE_LOG_RETENTION_DAYS``, 3 years by default).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Double, Identity, Index, String, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from afterwrite.models.base import Base


class ErasureLog(Base):
    __tablename__ = "erasure_log"
    __table_args__ = (
        Index("ix_erasure_log_user_hash", "user_hash"),
        Index("ix_erasure_log_erased_at", "erased_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    erased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    user_hash: Mapped[str] = mapped_column(String(64))
    """sha256 of the user id, hex."""
    counts: Mapped[dict[str, int]] = mapped_column(JSONB)
    """Store → rows, entries or versions erased (``query_history``, ``stream_entries``, …)."""
    collections: Mapped[list[str]] = mapped_column(JSONB)
    """Collections whose index was rebuilt without the user's documents."""
    host: Mapped[str] = mapped_column(String(255))
    """Where it ran (whose spill journals it cleaned)."""
    duration_s: Mapped[float] = mapped_column(Double)
    meta: Mapped[Any | None] = mapped_column("metadata", JSONB)
