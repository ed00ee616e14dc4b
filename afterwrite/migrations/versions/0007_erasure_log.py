"""erasure log: one row per afterwrite erase run (user hash and counts, never data)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "erasure_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "erased_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("user_hash", sa.String(length=64), nullable=False),
        sa.Column("counts", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("collections", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("duration_s", sa.Double(), nullable=False),
        sa.Column("metadata", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_erasure_log")),
    )
    op.create_index("ix_erasure_log_erased_at", "erasure_log", ["erased_at"], unique=False)
    op.create_index("ix_erasure_log_user_hash", "erasure_log", ["user_hash"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_erasure_log_user_hash", table_name="erasure_log")
    op.drop_index("ix_erasure_log_erased_at", table_name="erasure_log")
    op.drop_table("erasure_log")
