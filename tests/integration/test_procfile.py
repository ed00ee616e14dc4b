"""The Procfile under honcho (a real Procfile runner, as foreman and Heroku-like platforms run it),
and the concurrent migrations it implies.

honcho runs every line as a long-running process and stops them all when one exits: the
``release: afterwrite migrate`` line tore everything down seconds after start. Here the whole
Procfile runs for about 30 s against the test database and Redis, records go in through the
example web app and arrive in PostgreSQL, then Ctrl-C stops it: nothing is SIGKILLed and the
worker ends its warm shutdown with exit code 0.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
PROCFILE = ROOT / "Procfile"
RUN_S = 30.0
QUERIES = [f"procfile question {i}" for i in range(5)]


def _honcho() -> str:
    path = Path(sys.executable).parent / "honcho"
    if not path.is_file():
        pytest.fail("honcho is not installed: pip install honcho (the dev extra)")
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes() -> list[str]:
    return [line.split(":", 1)[0] for line in PROCFILE.read_text().splitlines() if ":" in line]


@contextlib.contextmanager
def _honcho_start(env: dict[str, str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    empty_env_file = log.parent / "empty.env"  # not a developer's .env
    empty_env_file.write_text("")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *(_honcho(), "-e", str(empty_env_file), "-d", str(ROOT), "-f", str(PROCFILE)),
                *("start", "--no-colour", "-p", str(port)),
            ],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
            # whatever honcho left behind (it starts each process in a session of its own)
            for pid in re.findall(r"started \(pid=(\d+)\)", log.read_text()):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(pid), signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_procfile_runs_under_honcho_stores_records_and_stops_gracefully(
    base_env: dict[str, str], pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    port = _free_port()
    env = {
        **base_env,
        # as in an activated virtualenv: the Procfile's commands are found on PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base_env.get('PATH', '')}",
        # AFTERWRITE_IMPORTS names the example kind's module, as a service names its own
        "PYTHONPATH": str(ROOT),
        "AFTERWRITE_FLOWER_USER": "ops",
        "AFTERWRITE_FLOWER_PASSWORD": "procfile-test",
        "AFTERWRITE_FLOWER_PORT": str(_free_port()),
        "AFTERWRITE_METRICS_USER": "prometheus",
        "AFTERWRITE_METRICS_PASSWORD": "procfile-scrape",
        "METRICS_PORT": str(_free_port()),
    }
    log = tmp_path / "honcho.log"
    started = time.monotonic()
    with _honcho_start(env, port, log) as honcho:

        def web_up() -> bool:
            assert honcho.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(web_up, timeout_s=60, interval_s=0.5, what="the web process to answer")
        ids = []
        for query in QUERIES:
            answer = httpx.post(f"http://127.0.0.1:{port}/ask", json={"query": query}, timeout=10)
            assert answer.status_code == 200, answer.text
            assert answer.json()["recorded"] == "sent"
            ids.append(answer.json()["event_id"])

        def stored() -> list[Any]:
            assert honcho.poll() is None, log.read_text()
            rows = pg.execute(
                "SELECT id::text, query FROM query_history WHERE id::text = ANY(%s)", (ids,)
            ).fetchall()
            return rows if len(rows) == len(ids) else []

        rows = wait_for(stored, timeout_s=60, interval_s=0.5, what="the worker to store rows")
        assert sorted(q for _, q in rows) == sorted(QUERIES)

        # still everything running after ~30 s: no line ended and took the others down
        time.sleep(max(0.0, RUN_S - (time.monotonic() - started)))
        assert honcho.poll() is None, log.read_text()
        output = log.read_text()
        assert "stopped" not in output, output
        for name in _processes():
            assert re.search(rf"{name}\.1 started \(pid=\d+\)", output), (name, output)

        stop_sent = time.monotonic()
        honcho.send_signal(signal.SIGINT)  # Ctrl-C
        honcho.wait(timeout=30)
        stop_s = time.monotonic() - stop_sent

    output = log.read_text()
    assert honcho.returncode == 130  # honcho's code for "stopped by SIGINT"
    assert "SIGKILL" not in output, output  # everything stopped within honcho's 5 s
    assert stop_s < 10, output
    for name in _processes():
        assert re.search(rf"{name}\.1 stopped \(rc=", output), (name, output)
    assert "worker.1 stopped (rc=0)" in output, output  # Celery's warm shutdown completed
    assert "Warm shutdown" in output
    assert "Application shutdown complete" in output  # uvicorn's lifespan ran: client closed


def test_concurrent_migrations_wait_for_each_other(
    base_env: dict[str, str], empty_database: str
) -> None:
    """Every worker line migrates before it starts: several at once on an empty database."""
    env = {**base_env, "AFTERWRITE_DATABASE_URL": empty_database}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "afterwrite.cli.main", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
    with psycopg.connect(empty_database) as conn:
        versions = conn.execute("SELECT count(*) FROM alembic_version").fetchone()
        tables = conn.execute("SELECT to_regclass('index_builds') IS NOT NULL").fetchone()
    assert versions is not None
    assert versions[0] == 2  # afterwrite's head and the example kind's branch
    assert tables == (True,)
