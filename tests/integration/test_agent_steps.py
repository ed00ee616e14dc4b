"""The worked example of a team's own kind (examples/agent_steps), producer → rows."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from afterwrite.core.settings import Settings
from afterwrite.models.registry import UnknownKindError, kinds
from afterwrite.producer import Client
from afterwrite.worker.operations.retention import run_retention
from afterwrite.worker.runtime import Runtime
from examples.agent_steps.model import AgentStep


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client.from_env(settings) as c:
        yield c


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings)
    yield rt
    rt.close()


def _step(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "created_at": datetime(2026, 11, 22, 9, 0, n, tzinfo=UTC),
        "agent": "researcher",
        "task_id": "task-17",
        "step": n,
        "status": "ok",
        "duration_ms": 120.5 + n,
        "prompt_tokens": 900,
        "completion_tokens": 80,
        "cost_usd": 0.0042,
        "model_id": "gpt-4o-mini",
        "tool": "web_search",
        **extra,
    }


def test_the_example_kind_is_registered_with_its_own_table() -> None:
    kind = kinds.get("agent_step")
    assert kind.model is AgentStep
    assert kind.table.name == "agent_steps"
    assert kind.retention_days == 30


def test_steps_round_trip_from_producer_to_rows(
    client: Client, runtime: Runtime, pg: psycopg.Connection[Any]
) -> None:
    ok = [client.record("agent_step", _step(n)) for n in range(3)]
    failed = client.record(
        "agent_step", _step(3, status="error", error="tool timed out", tool="browser")
    )
    bad_status = client.record("agent_step", _step(4, status="exploded"))
    no_reason = client.record("agent_step", _step(5, status="error"))

    report = runtime.drain("agent_step").run(budget_s=5)
    assert (report.inserted, report.dead_lettered) == (4, 2)

    with pg.cursor(row_factory=dict_row) as cur:
        rows = {str(r["id"]): r for r in cur.execute("SELECT * FROM agent_steps")}
    assert set(rows) == {*ok, failed}
    first = rows[ok[0]]
    assert first["created_at"] == datetime(2026, 11, 22, 9, 0, 0, tzinfo=UTC)
    assert (first["agent"], first["task_id"], first["step"], first["status"]) == (
        "researcher",
        "task-17",
        0,
        "ok",
    )
    assert (first["duration_ms"], first["prompt_tokens"], first["cost_usd"]) == (120.5, 900, 0.0042)
    assert rows[failed]["error"] == "tool timed out"
    dead = dict(pg.execute("SELECT event_id, error_code FROM dead_letters").fetchall())
    assert dead == {bad_status: "bad_status", no_reason: "missing_error"}


def test_the_kinds_default_retention_applies(
    runtime: Runtime, pg: psycopg.Connection[Any], settings: Settings, client: Client
) -> None:
    old = client.record("agent_step", _step(1, created_at=datetime.now(UTC) - timedelta(days=31)))
    new = client.record("agent_step", _step(2, created_at=datetime.now(UTC)))
    runtime.drain("agent_step").run(budget_s=5)
    reports = {
        r.kind: r for r in run_retention(pg, list(kinds), settings) if r.table != "dead_letters"
    }
    assert reports["agent_step"].deleted == 1
    assert "query" not in reports  # query history: kept forever unless configured
    assert [str(r[0]) for r in pg.execute("SELECT id FROM agent_steps")] == [new]
    assert old != new


def test_unknown_kinds_are_refused_by_the_client(client: Client) -> None:
    with pytest.raises(UnknownKindError):
        client.record("agent_stepz", _step(0))
