"""The ``afterwrite`` command line against the real services."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from afterwrite.cli.main import main
from afterwrite.core.settings import Settings
from afterwrite.demo.services import Endpoints, ensure_database
from afterwrite.producer import Client


@pytest.fixture
def env(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key in [k for k in os.environ if k.startswith("AFTERWRITE_")]:
        monkeypatch.delenv(key)
    for key, value in base_env.items():
        if key.startswith("AFTERWRITE_"):
            monkeypatch.setenv(key, value)
    return base_env


def test_status_reports_backlog_rows_and_dead_letters(
    env: dict[str, str], settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    with Client.from_env(settings) as client:
        for i in range(7):
            client.record_query(f"q{i}")
    pg.execute(
        "INSERT INTO dead_letters (kind, payload_raw, payload_sha256, reason, error_code, detail)"
        " VALUES ('query', '\\x00', '\\x01', 'invalid', 'nul_byte', 'x')"
    )
    result = CliRunner().invoke(main, ["status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    streams = {s["kind"]: s for s in report["streams"]}
    assert set(streams) == {"agent_step", "embed", "metric", "query"}  # every registered kind
    assert streams["query"]["length"] == 7
    assert streams["query"]["oldest_age_s"] is not None
    assert streams["agent_step"]["length"] == 0
    assert streams["agent_step"]["oldest_age_s"] is None
    assert {"kind": "query", "table": "query_history", "rows": 0, "estimated": False} in (
        report["tables"]
    )
    assert report["dead_letters"] == {"query": {"nul_byte": 1}}

    human = CliRunner().invoke(main, ["status"])
    assert human.exit_code == 0
    assert "query_history" in human.output
    assert "nul_byte" in human.output


def test_bad_settings_stop_the_cli_naming_the_variable(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AFTERWRITE_BATCH_MAX_ENTRIES", "lots")
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 2
    assert "AFTERWRITE_BATCH_MAX_ENTRIES" in result.output


def test_flower_refuses_to_start_without_credentials(env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "afterwrite.cli.main", "flower"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "AFTERWRITE_FLOWER_PASSWORD" in proc.stderr


def test_migrate_creates_the_schema(
    env: dict[str, str], endpoints: Endpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = ensure_database(
        endpoints.database_url, f"afterwrite_test_cli_{os.getpid()}", recreate=True
    )
    monkeypatch.setenv("AFTERWRITE_DATABASE_URL", url)
    result = CliRunner().invoke(main, ["migrate"])
    assert result.exit_code == 0, result.output
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regclass('query_history')").fetchone() == ("query_history",)
