"""Alembic environment: online migrations against the URL in the Alembic config."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from afterwrite import models
from afterwrite.models.registry import kinds

config = context.config
# afterwrite's tables, plus those of kinds an application registered with a Base of its own.
_own = [k.model.metadata for k in kinds if k.model.metadata is not models.Base.metadata]
target_metadata = [models.Base.metadata, *{id(m): m for m in _own}.values()]


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
