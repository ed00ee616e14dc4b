"""privacy: query_history.text_stored (store_text=False: query NULL) and redacted_by;
indexes for the embedding cache's retention

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column("query_history", "query", existing_type=sa.Text(), nullable=True)
    op.add_column(
        "query_history",
        sa.Column("text_stored", sa.Boolean(), server_default=sa.text("true"), nullable=False),
    )
    op.add_column(
        "query_history",
        sa.Column("redacted_by", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )

    # retention and erasure find cache entries no live document uses
    op.create_index("ix_embeddings_content_hash", "embeddings", ["content_hash"], unique=False)
    op.create_index(
        "ix_embedding_cache_created_at", "embedding_cache", ["created_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_embedding_cache_created_at", table_name="embedding_cache")
    op.drop_index("ix_embeddings_content_hash", table_name="embeddings")
    op.drop_column("query_history", "redacted_by")
    op.drop_column("query_history", "text_stored")
    # Rows stored without bodies get an empty query back, as NOT NULL demands.
    op.execute("UPDATE query_history SET query = '' WHERE query IS NULL")
    op.alter_column("query_history", "query", existing_type=sa.Text(), nullable=False)
