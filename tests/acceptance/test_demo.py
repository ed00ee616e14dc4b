"""The main job, as a newcomer runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

pytestmark = pytest.mark.acceptance


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # reachable by the unprivileged user a private PostgreSQL runs as when we are root
    path = Path(tempfile.mkdtemp(prefix="afterwrite-demo-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _demo(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "afterwrite.cli.main",
            "demo",
            "--records",
            "2000",
            "--documents",
            "240",
            *args,
        ],
        env={**env, "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_demo_on_private_services_as_on_a_fresh_machine(data_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERWRITE_")}
    proc = _demo(env, "--private", "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "starting private services" in proc.stdout
    assert "rows persisted" in proc.stdout
    assert "2,000" in proc.stdout
    # the knowledge base was embedded offline, indexed by beat and searched
    assert "embedding 240 knowledge-base articles with all-MiniLM-L6-v2-onnx-int8" in proc.stdout
    assert "searching 'kb'" in proc.stdout
    results = proc.stdout.split("searching 'kb'", 1)[1]
    # each question's results come from the articles on its topic
    for topic in ("password", "gpu", "rate_limits", "privacy"):
        assert f" {topic} " in results, results
    assert "worker and beat stopped" in proc.stdout
    # everything it started is stopped: the private servers' pid files are gone
    assert not list(data_dir.rglob("postmaster.pid"))


def test_demo_uses_configured_urls(base_env: dict[str, str], pg: psycopg.Connection[Any]) -> None:
    proc = _demo(base_env, "--data-dir", tempfile.mkdtemp())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "starting private services" not in proc.stdout
    assert pg.execute("SELECT count(*) FROM query_history").fetchone() == (2000,)
    assert pg.execute(
        "SELECT count(*) FROM embeddings WHERE collection = 'kb' AND NOT deleted"
    ).fetchone() == (240,)
