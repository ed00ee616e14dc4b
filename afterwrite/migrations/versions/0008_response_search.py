"""full-text search over responses: query_history.response_search_vector (opt-in)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

A plain, nullable ``tsvector`` column, filled by the drain's insert only while
``AFTERWRITE_SEARCH_RESPONSES`` is true, and a partial GIN index over the rows that have one.
Adding a NULL column rewrites nothing; the index starts empty.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "query_history", sa.Column("response_search_vector", postgresql.TSVECTOR(), nullable=True)
    )
    op.create_index(
        "ix_query_history_response_search_vector",
        "query_history",
        ["response_search_vector"],
        unique=False,
        postgresql_using="gin",
        postgresql_where=sa.text("response_search_vector IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_query_history_response_search_vector", table_name="query_history")
    op.drop_column("query_history", "response_search_vector")
