"""``afterwrite health`` with a real worker process: passes while it runs, fails once stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from afterwrite.demo.processes import start_worker
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance

# `afterwrite health`, with the command registered on the main group as afterwrite.cli.main does.
HEALTH = (
    "import sys; from afterwrite.cli.main import main; from afterwrite.cli.observe import health; "
    "main.add_command(health); sys.argv[0] = 'afterwrite'; main()"
)


def _health(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-c", HEALTH, "health", "--json", "--timeout-s", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode in {0, 1}, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_health_passes_with_a_worker_and_fails_without(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    code, report = _health(base_env)
    assert code == 1
    assert {c["name"]: c["ok"] for c in report["checks"]}["worker"] is False

    worker = start_worker(base_env, tmp_path / "logs", concurrency=1)
    try:

        def healthy() -> list[dict[str, Any]]:
            assert worker.alive(), worker.tail()
            code, report = _health(base_env)
            return [report] if code == 0 else []

        (report,) = wait_for(healthy, timeout_s=90, interval_s=0.5, what="health to pass")
        assert report["ok"] is True
        checks = {c["name"]: c for c in report["checks"]}
        assert all(c["ok"] for c in checks.values())
        assert "answered" in checks["worker"]["detail"]
    finally:
        assert worker.stop() is not None
    code, report = _health(base_env)
    assert code == 1
    assert report["ok"] is False
    assert {c["name"]: c["ok"] for c in report["checks"]} == {
        "redis": True,
        "postgres": True,
        "worker": False,
        "backlog": True,
        "problems": True,
        "schema": True,
    }
