"""initial schema: query_history, dead_letters

Revision ID: 0001
Revises:
Create Date: 2026-11-22

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("entry_id", sa.String(length=64), nullable=True),
        sa.Column("event_id", sa.String(length=64), nullable=True),
        sa.Column("payload_raw", sa.LargeBinary(), nullable=False),
        sa.Column("payload_sha256", sa.LargeBinary(length=32), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("delivery_count", sa.Integer(), server_default="1", nullable=False),
        sa.Column(
            "first_seen_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "last_seen_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
        sa.UniqueConstraint(
            "kind", "payload_sha256", name=op.f("uq_dead_letters_kind_payload_sha256")
        ),
    )
    op.create_index(
        "ix_dead_letters_kind_last_seen_at", "dead_letters", ["kind", "last_seen_at"], unique=False
    )
    op.create_index("ix_dead_letters_reason", "dead_letters", ["reason"], unique=False)
    op.create_table(
        "query_history",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.String(length=256), nullable=True),
        sa.Column("session_id", sa.String(length=256), nullable=True),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("mode", sa.String(length=64), nullable=True),
        sa.Column(
            "model_ids",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("response", sa.Text(), nullable=True),
        sa.Column("response_time_ms", sa.Double(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("retrieval", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("metadata", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "ingested_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_query_history")),
    )
    op.create_index("ix_query_history_created_at", "query_history", ["created_at"], unique=False)
    op.create_index(
        "ix_query_history_mode_created_at", "query_history", ["mode", "created_at"], unique=False
    )
    op.create_index(
        "ix_query_history_model_ids",
        "query_history",
        ["model_ids"],
        unique=False,
        postgresql_using="gin",
        postgresql_ops={"model_ids": "jsonb_path_ops"},
    )
    op.create_index(
        "ix_query_history_user_id_created_at",
        "query_history",
        ["user_id", "created_at"],
        unique=False,
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_query_history_user_id_created_at", table_name="query_history")
    op.drop_index(
        "ix_query_history_model_ids",
        table_name="query_history",
        postgresql_using="gin",
        postgresql_ops={"model_ids": "jsonb_path_ops"},
    )
    op.drop_index("ix_query_history_mode_created_at", table_name="query_history")
    op.drop_index("ix_query_history_created_at", table_name="query_history")
    op.drop_table("query_history")
    op.drop_index("ix_dead_letters_reason", table_name="dead_letters")
    op.drop_index("ix_dead_letters_kind_last_seen_at", table_name="dead_letters")
    op.drop_table("dead_letters")
