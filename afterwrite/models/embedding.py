"""Embeddings: the job kind producers send, the stored vectors, and the content cache.

``embed`` is an ordinary record kind (table ``embedding_jobs``): ``client.embed(...)`` and
``client.delete_embedding(...)`` XADD a job, and the generic drain stores it idempotently, with
validation, dead letters and reclaim like every kind. The embedding stage
(``afterwrite.worker.embedding``) then takes stored jobs in batches, calls the provider and writes
``embeddings``; a processed job row is deleted. Provider calls therefore never hold stream
entries pending, and a slow or rate-limiting provider cannot push entries into reclaim.

``embeddings`` holds one row per (collection, doc_id): the source of truth for the FAISS
indexes. ``id`` is the FAISS id (int64). ``seq`` rises on every change of vector or tombstone,
so an index build records the ``seq`` it saw and anything newer is the freshness delta.
``job_id`` is the last applied job: a job older than it (or the same one redelivered) changes
nothing, so replays and reordering are harmless.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    Sequence,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from afterwrite.core.collections import MAX_DOC_ID_CHARS, check_collection
from afterwrite.core.errors import PoisonError
from afterwrite.models.base import Base
from afterwrite.models.registry import register_kind

EMBED_KIND = "embed"
SEQ_NAME = "embedding_seq"
MAX_EMBED_TEXT_CHARS = 200_000
"""Longer texts are refused by the producer; the provider policy handles token limits."""

embedding_seq = Sequence(SEQ_NAME, metadata=Base.metadata)


class InvalidJob(PoisonError, ValueError):
    """An embedding job that can never be carried out (dead-lettered with ``code``)."""


def validate_job(payload: dict[str, Any]) -> None:
    """The embed kind's own rule, run by the drain after the type checks."""
    try:
        check_collection(payload.get("collection"))
    except ValueError as exc:
        raise InvalidJob("bad_collection", str(exc)) from None
    op = payload.get("op")
    text_ = payload.get("text")
    if op == "upsert":
        if not isinstance(text_, str) or not text_.strip():
            raise InvalidJob("empty_text", "an upsert needs non-empty text")
    elif op == "delete":
        if text_ is not None:
            raise InvalidJob("unexpected_text", "a delete carries no text")
    else:
        raise InvalidJob("bad_op", f"op must be 'upsert' or 'delete', got {op!r}")


@register_kind(EMBED_KIND, validate=validate_job, retention_days=None)
class EmbeddingJob(Base):
    __tablename__ = "embedding_jobs"
    __table_args__ = (Index("ix_embedding_jobs_collection_id", "collection", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    """The client's UUIDv7 event id; its time order is the order jobs apply in."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    """When the client enqueued the job."""
    collection: Mapped[str] = mapped_column(String(64))
    doc_id: Mapped[str] = mapped_column(String(MAX_DOC_ID_CHARS))
    op: Mapped[str] = mapped_column(String(8))
    text: Mapped[str | None] = mapped_column(Text, info={"max_chars": MAX_EMBED_TEXT_CHARS})
    meta: Mapped[dict[str, Any] | None] = mapped_column(
        "metadata", JSONB, info={"max_bytes": 64_000}
    )
    ingested_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    """When the drain committed the job (``ingested_at - created_at``: enqueue → committed)."""


class Embedding(Base):
    __tablename__ = "embeddings"
    __table_args__ = (
        UniqueConstraint("collection", "doc_id"),
        Index("ix_embeddings_collection_seq", "collection", "seq"),
        Index("ix_embeddings_content_hash", "content_hash"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    """The vector's id inside FAISS indexes."""
    collection: Mapped[str] = mapped_column(String(64))
    doc_id: Mapped[str] = mapped_column(String(MAX_DOC_ID_CHARS))
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    """The last job applied to this document."""
    deleted: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    """A tombstone: indexes drop the document."""
    model: Mapped[str | None] = mapped_column(String(200))
    dim: Mapped[int | None] = mapped_column(Integer)
    content_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    """sha256 of the normalised text (see ``afterwrite.worker.embedding.content_hash``)."""
    vector: Mapped[bytes | None] = mapped_column(LargeBinary)
    """``dim`` float32 values, little-endian, L2-normalised."""
    text: Mapped[str | None] = mapped_column(Text)
    """The embedded text (what a model change re-embeds)."""
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB)
    enqueued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    """When the client enqueued the job that set this row."""
    committed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    """When the drain committed that job."""
    embedded_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    """When this row was last written (vector or tombstone)."""
    seq: Mapped[int] = mapped_column(
        BigInteger, embedding_seq, server_default=embedding_seq.next_value()
    )
    """Rises on every change of vector or tombstone (a global sequence)."""


class EmbeddingCache(Base):
    """Vectors by (model, content hash): unchanged or repeated text costs no provider call."""

    __tablename__ = "embedding_cache"
    __table_args__ = (Index("ix_embedding_cache_created_at", "created_at"),)

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    content_hash: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
