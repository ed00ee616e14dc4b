"""Alembic migrations, run with ``afterwrite migrate``.

afterwrite's own revisions live in ``migrations/versions``. A team that adds record kinds keeps
its revisions in a directory of its own (a separate Alembic branch: ``down_revision = None``,
a ``branch_labels`` of its own, ``depends_on`` afterwrite's revision) and names it in
``AFTERWRITE_MIGRATION_DIRS``; ``afterwrite migrate`` then upgrades every branch to its head.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from alembic import command
from alembic.config import Config

HERE = Path(__file__).resolve().parent


def alembic_config(sqlalchemy_url: str, extra_dirs: Sequence[Path] = ()) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    locations = [HERE / "versions", *(Path(d).resolve() for d in extra_dirs)]
    cfg.set_main_option("version_locations", os.pathsep.join(str(p) for p in locations))
    # ConfigParser interpolation would choke on '%' in passwords.
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url.replace("%", "%%"))
    return cfg


def upgrade(sqlalchemy_url: str, revision: str = "heads", extra_dirs: Sequence[Path] = ()) -> None:
    command.upgrade(alembic_config(sqlalchemy_url, extra_dirs), revision)


def downgrade(sqlalchemy_url: str, revision: str, extra_dirs: Sequence[Path] = ()) -> None:
    command.downgrade(alembic_config(sqlalchemy_url, extra_dirs), revision)
