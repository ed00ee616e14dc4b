"""Fixtures for the fault tests: one private PostgreSQL + Redis (AOF) for the session, which a
test may stop and restart, and a launcher that stops every process a test started.

Private, not the shared local servers: outage tests stop the servers, and a parallel test run
on the shared servers must not see (or cause) any of it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from afterwrite.demo.services import PrivateServices
from tests.faults import Launcher, Stack

# The worked example of a team's own kind (registered by tests/conftest.py): its revisions are
# applied with afterwrite's, as in the shared test database.
EXAMPLE_MIGRATIONS = Path(__file__).resolve().parents[2] / "examples/agent_steps/migrations"


@pytest.fixture(scope="session")
def private_stack() -> Iterator[Stack]:
    # Not pytest's tmp_path: as root its base is mode 0700, and PostgreSQL runs as an
    # unprivileged user that must reach its data directory.
    data_dir = Path(tempfile.mkdtemp(prefix="afterwrite-faults-"))
    data_dir.chmod(0o755)
    services = PrivateServices(data_dir, postgres=True, redis=True, redis_appendonly=True)
    started = services.start()
    assert started.database_url is not None
    assert started.redis_url is not None
    stack = Stack(services, data_dir, started.database_url, started.redis_url)
    try:
        from afterwrite import migrations

        extra_dirs = [EXAMPLE_MIGRATIONS] if EXAMPLE_MIGRATIONS.is_dir() else []
        migrations.upgrade(
            "postgresql+psycopg://" + stack.database_url.split("://", 1)[1], extra_dirs=extra_dirs
        )
        yield stack
    finally:
        stack.close()


@pytest.fixture
def stack(private_stack: Stack) -> Iterator[Stack]:
    """The private stack, running and empty."""
    private_stack.ensure_running()
    private_stack.clean()
    yield private_stack
    private_stack.ensure_running()  # a failed outage test must not take the next test down


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launch = Launcher(tmp_path)
    try:
        yield launch
    finally:
        launch.stop_all()
        print(launch.tails())  # shown by pytest only when the test failed
