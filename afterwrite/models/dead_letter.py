"""``dead_letters``: entries afterwrite could not store, kept with the reason.

A poison entry is stored once per (kind, payload): seeing the same payload again (a redelivery
after a crash, a replay that fails again) bumps ``last_seen_at`` and ``delivery_count`` instead
of adding a row, so dead-lettering is idempotent like the inserts it protects.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from afterwrite.models.base import Base


class DeadLetter(Base):
    __tablename__ = "dead_letters"
    __table_args__ = (
        UniqueConstraint("kind", "payload_sha256"),
        Index("ix_dead_letters_kind_last_seen_at", "kind", "last_seen_at"),
        Index("ix_dead_letters_reason", "reason"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(64))
    entry_id: Mapped[str | None] = mapped_column(String(64))
    """Redis stream entry id of the latest delivery."""
    event_id: Mapped[str | None] = mapped_column(String(64))
    """The record's own id, when it could be read."""
    payload_raw: Mapped[bytes] = mapped_column(LargeBinary)
    """The entry's bytes exactly as received (what a replay re-sends)."""
    payload_sha256: Mapped[bytes] = mapped_column(LargeBinary(32))
    payload: Mapped[Any | None] = mapped_column(JSONB)
    """The payload decoded for reading and filtering, when it could be decoded."""
    reason: Mapped[str] = mapped_column(String(64))
    """Short machine-readable reason: ``undecodable``, ``invalid``, ``rejected``, …"""
    error_code: Mapped[str | None] = mapped_column(String(64))
    """Validation code or PostgreSQL SQLSTATE."""
    detail: Mapped[str] = mapped_column(Text)
    delivery_count: Mapped[int] = mapped_column(Integer, server_default="1")
    first_seen_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_seen_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
