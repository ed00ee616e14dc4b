"""agent_steps: the agent task/step log kind

A branch of its own (``branch_labels``), applied after afterwrite's initial schema.

Revision ID: a1f0
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "a1f0"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("agent_steps",)
depends_on: str | Sequence[str] | None = "0001"


def upgrade() -> None:
    op.create_table(
        "agent_steps",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("agent", sa.String(length=128), nullable=False),
        sa.Column("task_id", sa.String(length=128), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("duration_ms", sa.Double(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("cost_usd", sa.Double(), nullable=True),
        sa.Column("model_id", sa.String(length=128), nullable=True),
        sa.Column("tool", sa.String(length=128), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("metadata", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "ingested_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name="agent_steps_pkey"),
    )
    op.create_index("ix_agent_steps_agent_created_at", "agent_steps", ["agent", "created_at"])
    op.create_index("ix_agent_steps_created_at", "agent_steps", ["created_at"])
    op.create_index("ix_agent_steps_status_created_at", "agent_steps", ["status", "created_at"])
    op.create_index("ix_agent_steps_task_id", "agent_steps", ["task_id"])


def downgrade() -> None:
    op.drop_table("agent_steps")
