"""The ``agent_step`` kind: one row per step an agent ran."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Double, Index, Integer, String, Text, Uuid, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from afterwrite.models.registry import register_kind

STATUSES = frozenset({"ok", "error", "timeout", "cancelled"})


class StepRejected(ValueError):
    """Raised by the validator; ``code`` becomes the dead letter's error code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def validate(step: dict[str, Any]) -> None:
    """Domain rules beyond types (the worker checks those from the table)."""
    if step["status"] not in STATUSES:
        raise StepRejected("bad_status", f"status {step['status']!r} not in {sorted(STATUSES)}")
    if step["status"] == "error" and not step.get("error"):
        raise StepRejected("missing_error", "a failed step must say why")


class Base(DeclarativeBase):
    """The team's own declarative base: its tables stay out of afterwrite's metadata."""


@register_kind("agent_step", retention_days=30, validate=validate)
class AgentStep(Base):
    __tablename__ = "agent_steps"
    __table_args__ = (
        Index("ix_agent_steps_agent_created_at", "agent", "created_at"),
        Index("ix_agent_steps_task_id", "task_id"),
        Index("ix_agent_steps_status_created_at", "status", "created_at"),
        Index("ix_agent_steps_created_at", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    agent: Mapped[str] = mapped_column(String(128))
    task_id: Mapped[str] = mapped_column(String(128))
    step: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    duration_ms: Mapped[float] = mapped_column(Double)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[float | None] = mapped_column(Double)
    model_id: Mapped[str | None] = mapped_column(String(128))
    tool: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB)
    ingested_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
