"""``index_builds``: one row per FAISS index build or freshness delta, with its timings.

Written by ``afterwrite.worker.index`` (plain SQL through psycopg); read by ``afterwrite index
status`` and by freshness measurements: a row of ``embeddings`` became searchable at the
``finished_at`` of the first *published* build or delta of its collection whose ``max_seq`` is at
least the row's ``seq``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Double, Identity, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from afterwrite.models.base import Base

BUILD_KINDS = ("build", "delta")
BUILD_STATUSES = ("published", "skipped", "rejected", "failed")


class IndexBuild(Base):
    __tablename__ = "index_builds"
    __table_args__ = (Index("ix_index_builds_collection_started_at", "collection", "started_at"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    collection: Mapped[str] = mapped_column(String(64))
    version: Mapped[int | None] = mapped_column(Integer)
    """The published index version (for a delta: the version it applies to)."""
    kind: Mapped[str] = mapped_column(String(8))
    """``build`` or ``delta``."""
    status: Mapped[str] = mapped_column(String(16))
    """``published``, ``skipped``, ``rejected`` (below the recall floor) or ``failed``."""
    vector_count: Mapped[int | None] = mapped_column(BigInteger)
    max_seq: Mapped[int | None] = mapped_column(BigInteger)
    """Every row of the collection with ``seq`` up to this is reflected in what was built."""
    model: Mapped[str | None] = mapped_column(String(200))
    dim: Mapped[int | None] = mapped_column(Integer)
    index_type: Mapped[str | None] = mapped_column(String(200))
    read_s: Mapped[float | None] = mapped_column(Double)
    build_s: Mapped[float | None] = mapped_column(Double)
    write_s: Mapped[float | None] = mapped_column(Double)
    recall_at_10: Mapped[float | None] = mapped_column(Double)
    detail: Mapped[str | None] = mapped_column(Text)
    """Why it was skipped, rejected or failed."""
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
