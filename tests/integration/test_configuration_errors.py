"""A configuration error stops its task loudly and visibly, and a fix resumes it at once.

Real Redis, PostgreSQL and Celery task functions in a worker-like process; the "misconfiguration"
is the query table missing (a database that was not migrated), made by renaming the table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from click.testing import CliRunner

from afterwrite.cli.main import main as cli
from afterwrite.core.settings import Settings
from afterwrite.producer import Client
from afterwrite.worker import problems
from afterwrite.worker.operations.health import run_health
from afterwrite.worker.operations.status import collect

# One process that keeps its runtime (and so its pauses) between steps; the test drives it
# line by line through stdin.
_WORKER = """
import json, sys
from afterwrite.worker import tasks

def step(call):
    try:
        return {"result": call()}
    except Exception as exc:
        return {"raised": type(exc).__name__, "message": str(exc)}

for line in sys.stdin:
    action = line.strip()
    task = tasks.drain if action == "drain" else tasks.reclaim
    print(json.dumps(step(lambda: task.run("query"))), flush=True)
"""


@pytest.fixture
def worker(settings: Settings, base_env: dict[str, str]) -> Iterator[Any]:
    env = {**base_env, "AFTERWRITE_DATA_DIR": str(settings.data_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None

    def run(action: str) -> dict[str, Any]:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(action + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, f"the worker process exited ({proc.wait(10)})"
        out: dict[str, Any] = json.loads(line)
        return out

    yield run
    proc.stdin.close()
    proc.wait(30)
    proc.stdout.close()


@pytest.fixture
def table_missing(pg: psycopg.Connection[Any]) -> Iterator[None]:
    pg.execute("ALTER TABLE query_history RENAME TO query_history_away")
    try:
        yield
    finally:
        pg.execute("ALTER TABLE IF EXISTS query_history_away RENAME TO query_history")


def _record(settings: Settings, rdb: redis.Redis, n: int) -> list[str]:
    with Client(rdb, settings) as client:
        return [str(client.record_query(f"question {i}?", user_id="u")) for i in range(n)]


def test_a_missing_table_stops_the_drain_visibly_until_migrate(
    settings: Settings,
    rdb: redis.Redis,
    pg: psycopg.Connection[Any],
    table_missing: None,
    worker: Any,
    base_env: dict[str, str],
) -> None:
    ids = _record(settings, rdb, 20)

    first = worker("drain")
    assert first.get("raised") == "UndefinedTable", first  # Celery and Flower show a failure

    # Visible where operators look, with the error and no secret
    found = problems.read(rdb, settings.stream_prefix)
    assert [p.task for p in found] == ["drain:query"]
    assert "query_history" in found[0].error
    assert found[0].retry_in_s >= problems.FIRST_PAUSE_S / 2
    health = run_health(settings, worker=False)
    assert not health.ok
    failed = {c.name: c for c in health.checks if not c.ok}
    # the table is missing: the schema check says "run migrate", the problems check why
    assert set(failed) == {"schema", "problems"}, health.as_dict()
    assert "drain:query" in failed["problems"].detail
    assert [p.task for p in collect(settings).problems] == ["drain:query"]

    # Not retried every kick, and not claimed by a reclaim (that would count deliveries)
    again = worker("drain")
    assert "stopped by a configuration error" in again["result"]["skipped"], again
    reclaim = worker("reclaim")
    assert "configuration problem" in reclaim["result"]["skipped"], reclaim

    # The fix: the table is back, and `afterwrite migrate` tells the workers
    pg.execute("ALTER TABLE query_history_away RENAME TO query_history")
    migrated = CliRunner().invoke(cli, ["migrate"], env=_cli_env(base_env, settings))
    assert migrated.exit_code == 0, migrated.output
    assert "retry now" in migrated.output

    resumed = worker("drain")
    assert resumed["result"].get("inserted") == len(ids), resumed
    assert problems.read(rdb, settings.stream_prefix) == []
    assert run_health(settings, worker=False).ok
    stored = pg.execute("SELECT count(*) FROM query_history").fetchone()
    assert stored == (len(ids),)


def _cli_env(base_env: dict[str, str], settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in base_env.items() if k.startswith("AFTERWRITE_")}
    return {**env, "AFTERWRITE_DATA_DIR": str(settings.data_dir)}
