"""The Alembic revisions produce exactly the models' schema, and downgrade cleanly."""

from __future__ import annotations

import os
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from afterwrite import migrations, models
from afterwrite.demo.services import Endpoints, ensure_database


@pytest.fixture
def scratch_url(endpoints: Endpoints) -> str:
    """A fresh, empty database (the session's test database stays migrated)."""
    url = ensure_database(
        endpoints.database_url, f"afterwrite_test_migrations_{os.getpid()}", recreate=True
    )
    return "postgresql+psycopg://" + url.split("://", 1)[1]


def _diff(url: str) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, models.Base.metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_models(scratch_url: str) -> None:
    migrations.upgrade(scratch_url)
    assert _diff(scratch_url) == []


def test_downgrade_then_upgrade_round_trips(scratch_url: str) -> None:
    migrations.upgrade(scratch_url)
    migrations.downgrade(scratch_url, "base")
    assert _tables(scratch_url) <= {"alembic_version"}
    migrations.upgrade(scratch_url)
    assert {"query_history", "dead_letters"} <= _tables(scratch_url)
    assert _diff(scratch_url) == []


def test_empty_database_differs_from_the_models(scratch_url: str) -> None:
    # the comparison above can fail: without migrations there is a diff
    assert _diff(scratch_url) != []


def test_an_applications_own_revisions_apply_with_afterwrites(scratch_url: str) -> None:
    from examples.agent_steps.model import Base as ExampleBase
    from tests.conftest import EXAMPLE_MIGRATIONS

    migrations.upgrade(scratch_url, extra_dirs=[EXAMPLE_MIGRATIONS])
    assert {"query_history", "dead_letters", "agent_steps"} <= _tables(scratch_url)
    engine = create_engine(scratch_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            metadata = [models.Base.metadata, ExampleBase.metadata]
            # alembic accepts a sequence of MetaData (as env.py passes), its stub says one
            assert list(compare_metadata(ctx, metadata)) == []  # type: ignore[arg-type]
    finally:
        engine.dispose()
    migrations.downgrade(scratch_url, "base", extra_dirs=[EXAMPLE_MIGRATIONS])
    assert _tables(scratch_url) <= {"alembic_version"}
