"""metrics: metric_points, metric_rollups, afterwrite_sketch_merge()

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Merging quantile sketches (afterwrite.core.sketch JSON form) by adding their bucket counts, for the
# metric rollup upsert. It walks only the keys of ``b`` (the batch's small sketch) and overlays
# the sums on ``a`` (the stored one) with ``||``: twice as fast as re-aggregating both, and the
# upsert runs it once per touched bucket per batch. Either argument may be NULL or lack a part.
SKETCH_MERGE_PART = """
CREATE FUNCTION afterwrite_sketch_merge_part(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT coalesce(a, '{}'::jsonb) || coalesce(
    (SELECT jsonb_object_agg(key, coalesce((a ->> key)::bigint, 0) + value::bigint)
     FROM jsonb_each_text(b)),
    '{}'::jsonb)
$$
"""
SKETCH_MERGE = """
CREATE FUNCTION afterwrite_sketch_merge(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT jsonb_build_object(
    'p', afterwrite_sketch_merge_part(a -> 'p', b -> 'p'),
    'n', afterwrite_sketch_merge_part(a -> 'n', b -> 'n'),
    'z', coalesce((a ->> 'z')::bigint, 0) + coalesce((b ->> 'z')::bigint, 0))
$$
"""


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "metric_points",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column(
            "tags",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column(
            "ingested_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metric_points")),
    )
    op.create_index("ix_metric_points_created_at", "metric_points", ["created_at"], unique=False)
    op.create_index(
        "ix_metric_points_name_created_at", "metric_points", ["name", "created_at"], unique=False
    )
    op.create_table(
        "metric_rollups",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("bucket_s", sa.Integer(), nullable=False),
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tags", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("sum", sa.Double(), nullable=False),
        sa.Column("min", sa.Double(), nullable=False),
        sa.Column("max", sa.Double(), nullable=False),
        sa.Column("sketch", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.PrimaryKeyConstraint(
            "name", "bucket_s", "bucket_start", "tags", name=op.f("pk_metric_rollups")
        ),
    )
    op.execute(SKETCH_MERGE_PART)
    op.execute(SKETCH_MERGE)


def downgrade() -> None:
    """Downgrade schema."""
    op.execute("DROP FUNCTION afterwrite_sketch_merge(jsonb, jsonb)")
    op.execute("DROP FUNCTION afterwrite_sketch_merge_part(jsonb, jsonb)")
    op.drop_table("metric_rollups")
    op.drop_index("ix_metric_points_name_created_at", table_name="metric_points")
    op.drop_index("ix_metric_points_created_at", table_name="metric_points")
    op.drop_table("metric_points")
