"""``afterwrite health`` against the real services (no worker here: see
tests/acceptance/test_health.py for a live one)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest
from click.testing import CliRunner

from afterwrite.cli.observe import EXIT_HEALTHY, EXIT_UNHEALTHY, health
from afterwrite.core.settings import Settings, load_settings
from afterwrite.producer import Client
from afterwrite.worker.operations.health import run_health


@pytest.fixture
def env(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key in [k for k in os.environ if k.startswith("AFTERWRITE_")]:
        monkeypatch.delenv(key)
    for key, value in base_env.items():
        if key.startswith("AFTERWRITE_"):
            monkeypatch.setenv(key, value)
    return base_env


def _checks(report: dict[str, Any]) -> dict[str, bool]:
    return {c["name"]: c["ok"] for c in report["checks"]}


def test_healthy_without_the_worker_check(env: dict[str, str]) -> None:
    result = CliRunner().invoke(health, ["--json", "--no-worker"])
    assert result.exit_code == EXIT_HEALTHY, result.output
    report = json.loads(result.output)
    assert report["ok"] is True
    assert _checks(report) == {
        "redis": True,
        "postgres": True,
        "backlog": True,
        "problems": True,
        "schema": True,
    }
    assert all(c["duration_s"] < 5 for c in report["checks"])

    human = CliRunner().invoke(health, ["--no-worker"])
    assert human.exit_code == EXIT_HEALTHY
    assert "ok   backlog" in human.output


def test_no_worker_answering_is_unhealthy(env: dict[str, str]) -> None:
    started = time.monotonic()
    result = CliRunner().invoke(health, ["--json", "--timeout-s", "0.5"])
    assert result.exit_code == EXIT_UNHEALTHY, result.output
    assert time.monotonic() - started < 10
    report = json.loads(result.output)
    assert _checks(report) == {
        "redis": True,
        "postgres": True,
        "worker": False,
        "backlog": True,
        "problems": True,
        "schema": True,
    }
    (worker,) = [c for c in report["checks"] if c["name"] == "worker"]
    assert "no worker answered" in worker["detail"]


def test_an_old_backlog_is_unhealthy(env: dict[str, str], settings: Settings) -> None:
    with Client.from_env(settings) as client:
        client.record_query("waiting")
    time.sleep(0.3)
    result = CliRunner().invoke(health, ["--json", "--no-worker", "--max-backlog-age-s", "0.2"])
    assert result.exit_code == EXIT_UNHEALTHY
    report = json.loads(result.output)
    assert _checks(report)["backlog"] is False
    backlog = next(c for c in report["checks"] if c["name"] == "backlog")
    assert "'query'" in backlog["detail"]
    assert CliRunner().invoke(health, ["--no-worker", "--max-backlog-age-s", "60"]).exit_code == 0


def test_unreachable_services_fail_their_checks_quickly(settings: Settings) -> None:
    down = load_settings(
        {}, database_url="postgresql://u:hunter2@127.0.0.1:1/db", redis_url="redis://127.0.0.1:1/0"
    )
    started = time.monotonic()
    report = run_health(down, timeout_s=0.5)
    assert time.monotonic() - started < 10
    assert not report.ok
    checks = {c.name: c for c in report.checks}
    assert [c.ok for c in report.checks] == [False] * 5
    assert checks["worker"].detail.startswith("not checked")
    assert "hunter2" not in json.dumps(report.as_dict())  # secrets masked in details

    pg_only_down = load_settings(
        {}, database_url="postgresql://u@127.0.0.1:1/db", redis_url=settings.redis_url
    )
    report = run_health(pg_only_down, timeout_s=0.5, worker=False)
    assert {c.name: c.ok for c in report.checks} == {
        "redis": True,
        "postgres": False,
        "backlog": True,
        "problems": True,
    }


def test_bad_configuration_exits_2(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AFTERWRITE_DATABASE_URL")
    result = CliRunner().invoke(health, ["--json"])
    assert result.exit_code == 2
    assert "AFTERWRITE_DATABASE_URL" in result.output
