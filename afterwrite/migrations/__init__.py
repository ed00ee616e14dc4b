"""Alembic migrations, run with ``afterwrite migrate``.

afterwrite's own revisions live in ``migrations/versions``. A team that adds record kinds keeps
its revisions in a directory of its own (a separate Alembic branch: ``down_revision = None``,
a ``branch_labels`` of its own, ``depends_on`` afterwrite's revision) and names it in
``AFTERWRITE_MIGRATION_DIRS``; ``afterwrite migrate`` then upgrades every branch to its head.

Migrations may run concurrently (every worker of a Procfile runs ``afterwrite migrate`` before
it starts): each takes a PostgreSQL advisory lock first, so one migrates while the others wait,
then find the schema at its head and do nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config

HERE = Path(__file__).resolve().parent
MIGRATE_LOCK_KEY = 0x6166_7465_7277_7269  # "afterwri": one key, whatever the database
"""The advisory lock (64-bit key) a migration holds; other afterwrite locks use other keys."""


def alembic_config(sqlalchemy_url: str, extra_dirs: Sequence[Path] = ()) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    locations = [HERE / "versions", *(Path(d).resolve() for d in extra_dirs)]
    cfg.set_main_option("version_locations", os.pathsep.join(str(p) for p in locations))
    # ConfigParser interpolation would choke on '%' in passwords.
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url.replace("%", "%%"))
    return cfg


@contextmanager
def migration_lock(sqlalchemy_url: str) -> Iterator[None]:
    """Hold the migration advisory lock (waiting for another migration to finish) on a
    connection of its own; released when the block ends or the process dies."""
    import psycopg

    url = sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK_KEY,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK_KEY,))


def upgrade(sqlalchemy_url: str, revision: str = "heads", extra_dirs: Sequence[Path] = ()) -> None:
    with migration_lock(sqlalchemy_url):
        command.upgrade(alembic_config(sqlalchemy_url, extra_dirs), revision)


def downgrade(sqlalchemy_url: str, revision: str, extra_dirs: Sequence[Path] = ()) -> None:
    with migration_lock(sqlalchemy_url):
        command.downgrade(alembic_config(sqlalchemy_url, extra_dirs), revision)
