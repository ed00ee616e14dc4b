"""Real services for every test layer.

The tests use, in order: ``AFTERWRITE_TEST_DATABASE_URL`` / ``AFTERWRITE_TEST_REDIS_URL`` when
set; else PostgreSQL and Redis on their usual local ports when reachable; else private
instances started under a temporary directory (system binaries, or the ``embedded`` extra);
``AFTERWRITE_TEST_SERVICES=private`` forces the latter, as on a fresh machine.
On PostgreSQL a fresh database ``afterwrite_test_<pid>`` is created and migrated for the
session (dropped at its end); each test starts with empty tables and an empty Redis database
(number 2-11, chosen by pid, or ``AFTERWRITE_TEST_REDIS_DB``).
``AFTERWRITE_*`` variables of the developer's shell are ignored: tests never touch a
configured deployment.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

import examples.agent_steps.model  # noqa: F401  (registers the agent_step kind)
from afterwrite.core.settings import Settings, load_settings
from afterwrite.demo.services import Endpoints, PrivateServices, ensure_database, local_endpoints

# Per test session, so that several sessions on one machine (developers, CI, helpers running
# pytest at once) never flush or drop each other's state.
TEST_DATABASE = f"afterwrite_test_{os.getpid()}"
# The worked example of a team's own kind is registered in every test session, as an
# application would with AFTERWRITE_IMPORTS, and its revision applied with afterwrite's.
EXAMPLE_MIGRATIONS = Path(__file__).resolve().parent.parent / "examples/agent_steps/migrations"
# Redis database 2-11 by pid; 12-15 are left for sessions that must never meet another one
# (AFTERWRITE_TEST_REDIS_DB=12 ./dev test, e.g. two checkouts testing side by side).
TEST_REDIS_DB = int(os.environ.get("AFTERWRITE_TEST_REDIS_DB", 2 + os.getpid() % 10))


def _with_db(url: str, db: int) -> str:
    base = url.split("?", 1)[0].rstrip("/")
    scheme, rest = base.split("://", 1)
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/{db}"


@pytest.fixture(scope="session")
def endpoints() -> Iterator[Endpoints]:
    admin_url = os.environ.get("AFTERWRITE_TEST_DATABASE_URL")
    redis_url = os.environ.get("AFTERWRITE_TEST_REDIS_URL")
    if os.environ.get("AFTERWRITE_TEST_SERVICES") == "private":
        pass  # what a fresh machine does: start our own, ignore local servers
    elif admin_url is None or redis_url is None:
        local_pg, local_redis = local_endpoints()
        admin_url = admin_url or local_pg
        redis_url = redis_url or local_redis
    private: PrivateServices | None = None
    if admin_url is None or redis_url is None:
        # Not pytest's tmp_path: as root its base is mode 0700, and a private PostgreSQL runs
        # as an unprivileged user that must reach its data directory.
        services_dir = Path(tempfile.mkdtemp(prefix="afterwrite-test-"))
        services_dir.chmod(0o755)
        private = PrivateServices(
            services_dir,
            postgres=admin_url is None,
            redis=redis_url is None,
        )
        started = private.start()
        admin_url = admin_url or started.database_url
        redis_url = redis_url or started.redis_url
    assert admin_url is not None
    assert redis_url is not None
    database_url = ensure_database(admin_url, TEST_DATABASE, recreate=True)
    from afterwrite import migrations

    migrations.upgrade(
        "postgresql+psycopg://" + database_url.split("://", 1)[1], extra_dirs=[EXAMPLE_MIGRATIONS]
    )
    try:
        yield Endpoints(database_url, _with_db(redis_url, TEST_REDIS_DB))
    finally:
        _drop(admin_url, TEST_DATABASE)
        if private is not None:
            private.stop()
            shutil.rmtree(services_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def base_env(endpoints: Endpoints) -> Iterator[dict[str, str]]:
    """Environment for afterwrite processes under test (no variables from the developer)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERWRITE_")}
    env["AFTERWRITE_DATABASE_URL"] = endpoints.database_url
    env["AFTERWRITE_REDIS_URL"] = endpoints.redis_url
    data_dir = tempfile.mkdtemp(prefix="afterwrite-test-data-")
    env["AFTERWRITE_DATA_DIR"] = data_dir
    # the session's database carries the example kind's revision: every process must know it
    env["AFTERWRITE_IMPORTS"] = "examples.agent_steps.model"
    env["AFTERWRITE_MIGRATION_DIRS"] = str(EXAMPLE_MIGRATIONS)
    yield env
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def cli_env(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The test database in the environment, nothing of the developer's AFTERWRITE_*: for
    commands run in this process (click's CliRunner)."""
    for key in [k for k in os.environ if k.startswith("AFTERWRITE_")]:
        monkeypatch.delenv(key)
    for key in [k for k in base_env if k.startswith("AFTERWRITE_")]:
        monkeypatch.setenv(key, base_env[key])


@pytest.fixture
def settings(endpoints: Endpoints, tmp_path: Path) -> Settings:
    # data_dir (spill journal, indexes) per test: nothing lands in the checkout or leaks
    # between tests
    return load_settings(
        {},
        database_url=endpoints.database_url,
        redis_url=endpoints.redis_url,
        data_dir=tmp_path / "afterwrite-data",
    )


@pytest.fixture
def rdb(endpoints: Endpoints) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(endpoints.redis_url)
    yield conn
    conn.close()


@pytest.fixture
def pg(endpoints: Endpoints) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(endpoints.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(autouse=True)
def clean_state(request: pytest.FixtureRequest) -> Iterator[None]:
    """Empty tables and Redis before and after each test that uses the services."""
    if "endpoints" not in request.fixturenames:
        yield
        return
    endpoints: Endpoints = request.getfixturevalue("endpoints")
    _clean(endpoints)
    yield
    _clean(endpoints)


def _clean(endpoints: Endpoints) -> None:
    r = redis.Redis.from_url(endpoints.redis_url)
    r.flushdb()
    r.close()
    with psycopg.connect(endpoints.database_url, autocommit=True) as conn:
        # every table but Alembic's: kinds, dead letters, embeddings, index builds, …
        names = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename <> 'alembic_version'"
            )
        ]
        tables = ", ".join(f'"{n}"' for n in names)
        conn.execute(f"TRUNCATE {tables}")


def _drop(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_database(endpoints: Endpoints) -> Iterator[str]:
    """The URL of a database of its own with no schema at all (``afterwrite migrate`` never ran
    on it); dropped after the test."""
    name = f"afterwrite_test_empty_{os.getpid()}"
    url = ensure_database(endpoints.database_url, name, recreate=True)
    try:
        yield url
    finally:
        _drop(endpoints.database_url, name)
