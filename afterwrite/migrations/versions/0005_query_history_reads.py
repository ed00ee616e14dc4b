"""query history reads: full-text search vector and the conversation index

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

Adds ``query_history.search_vector`` (a stored generated ``tsvector`` of the query) with
its GIN index, and ``(session_id, created_at, id)`` for conversations. Adding a stored generated
column rewrites the table under an exclusive lock: plan it like any table rewrite (a minute
or two per million rows on the development machine).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEARCH_VECTOR_SQL = "to_tsvector('english'::regconfig, query)"


def upgrade() -> None:
    op.add_column(
        "query_history",
        sa.Column(
            "search_vector",
            postgresql.TSVECTOR(),
            sa.Computed(sa.text(SEARCH_VECTOR_SQL), persisted=True),
            nullable=True,
        ),
    )
    op.create_index(
        "ix_query_history_search_vector",
        "query_history",
        ["search_vector"],
        unique=False,
        postgresql_using="gin",
    )
    op.create_index(
        "ix_query_history_session_id_created_at",
        "query_history",
        ["session_id", "created_at", "id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_query_history_session_id_created_at", table_name="query_history")
    op.drop_index("ix_query_history_search_vector", table_name="query_history")
    op.drop_column("query_history", "search_vector")
