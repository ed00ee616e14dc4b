"""Flower as ``afterwrite flower`` starts it: authentication on by default, and what it shows
for afterwrite's tasks run by a live worker."""

from __future__ import annotations

import ast
import base64
import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from afterwrite.core.settings import Settings
from afterwrite.demo.processes import Process, start_worker
from afterwrite.producer import Client
from afterwrite.worker.app import DRAIN_TASK
from tests.helpers import listening_addresses, wait_for

pytestmark = pytest.mark.acceptance


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _get_json(url: str, auth: tuple[str, str]) -> Any:
    request = urllib.request.Request(url)
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


AUTH = ("ops", "correct horse")


@contextmanager
def _running_flower(
    base_env: dict[str, str], tmp_path: Path, **settings: str
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``afterwrite flower`` with credentials (and ``settings``, AFTERWRITE_* without the
    prefix), listening; stopped on exit."""
    port = _free_port()
    env = {
        **base_env,
        "AFTERWRITE_FLOWER_USER": AUTH[0],
        "AFTERWRITE_FLOWER_PASSWORD": AUTH[1],
        "AFTERWRITE_FLOWER_PORT": str(port),
        **{f"AFTERWRITE_{k.upper()}": v for k, v in settings.items()},
    }
    log_path = tmp_path / f"flower-{port}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "afterwrite.cli.main", "flower"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def up() -> bool:
            assert proc.poll() is None, log_path.read_text()
            return bool(listening_addresses(port))

        wait_for(up, timeout_s=60, what="Flower to listen")
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture
def flower(
    base_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``afterwrite flower`` as configured by default; stopped after the test."""
    with _running_flower(base_env, tmp_path) as running:
        yield running


def test_flower_listens_on_this_machine_only_unless_told_otherwise(
    flower: tuple[subprocess.Popen[bytes], int], base_env: dict[str, str], tmp_path: Path
) -> None:
    _, port = flower
    # Flower's own default is every interface (0.0.0.0 and ::)
    assert listening_addresses(port) == {"127.0.0.1"}
    with _running_flower(base_env, tmp_path, flower_address="127.0.0.2") as (_, other):
        assert listening_addresses(other) == {"127.0.0.2"}
        assert _status(f"http://127.0.0.2:{other}/healthcheck", AUTH) == 200


# Flower's own monitor endpoints were open to anyone before afterwrite guarded them.
PAGES = ("/", "/metrics", "/healthcheck", "/api/workers", "/api/tasks")


def test_flower_answers_401_without_credentials(
    flower: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = flower
    for page in PAGES:
        url = f"http://127.0.0.1:{port}{page}"
        assert _status(url) == 401, page
        assert _status(url, ("ops", "wrong")) == 401, page
        assert _status(url, AUTH) == 200, page
    # the password is not on the command line, where `ps` would show it
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    assert b"correct horse" not in cmdline


def test_the_task_list_shows_kind_and_rows_by_default(
    flower: tuple[subprocess.Popen[bytes], int],
) -> None:
    """The kind is a task's argument and the rows are in its result: both are columns, so a
    user sees them without opening each task (Flower's default hides them)."""
    _, port = flower
    request = urllib.request.Request(f"http://127.0.0.1:{port}/tasks")
    token = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        page = response.read().decode()
    columns = re.findall(r'<th data-column="([a-z_]+)">', page)
    assert columns == ["name", "args", "result", "received", "runtime"]


@pytest.fixture
def live_worker(base_env: dict[str, str], tmp_path: Path) -> Iterator[Process]:
    worker = start_worker(base_env, tmp_path / "logs", concurrency=1, loglevel="INFO")
    try:
        yield worker
    finally:
        worker.stop()
        print(worker.tail())  # shown when the test failed


def _drains_in_flower(port: int) -> list[dict[str, Any]]:
    tasks = _get_json(f"http://127.0.0.1:{port}/api/tasks?taskname={DRAIN_TASK}", AUTH)
    return [t for t in tasks.values() if t.get("state") == "SUCCESS"]


def test_flower_lists_drain_tasks_with_their_counts(
    flower: tuple[subprocess.Popen[bytes], int],
    live_worker: Process,
    settings: Settings,
    base_env: dict[str, str],
) -> None:
    _, port = flower
    sender = Celery("test-sender", broker=base_env["AFTERWRITE_REDIS_URL"], set_as_current=False)
    sender.conf.update(task_serializer="json", accept_content=["json"])
    try:
        # Flower sees events from when it connected: kick an empty drain until it shows up.
        def seen_once() -> bool:
            assert live_worker.alive(), live_worker.tail()
            sender.send_task(DRAIN_TASK, args=["metric"])
            return any(t["args"] == "['metric']" for t in _drains_in_flower(port))

        wait_for(seen_once, timeout_s=60, interval_s=1.0, what="Flower to show a drain task")

        with Client.from_env(settings) as client:
            for i in range(17):
                client.record_query(f"shown in flower {i}")
        sender.send_task(DRAIN_TASK, args=["query"])

        def query_drains() -> list[dict[str, Any]]:
            return [t for t in _drains_in_flower(port) if t["args"] == "['query']"]

        (task,) = wait_for(query_drains, timeout_s=60, what="the query drain in Flower")
    finally:
        sender.close()
    result = ast.literal_eval(task["result"])  # Flower shows the task's return value
    assert result["kind"] == "query"
    assert (result["entries"], result["inserted"], result["dead_lettered"]) == (17, 17, 0)
    assert result["batches"] == 1
    assert result["duration_s"] >= 0
    assert result["max_lag_s"] is not None
    assert result["max_lag_s"] >= 0
    assert task["runtime"] is not None
    # nothing secret travels with the task: its arguments are kind names only
    shown = json.dumps(task)
    assert "redis://" not in shown
    assert "postgresql://" not in shown
