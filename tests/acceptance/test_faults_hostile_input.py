"""Hostile input reaching a live worker through its broker.

Promise: nothing runs that came in as data. A pickle-typed Celery message is refused without
being unpickled (its payload would create a marker file); a kind name carrying SQL fails
before any SQL is built, and the worker keeps draining.
"""

from __future__ import annotations

import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu.connection import Connection

from tests.faults import Launcher, Stack, log_lines, pg_value, record_all, redis_conn, row_count
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance

HOSTILE_KINDS = ("query; DROP TABLE query_history", "query_history; DROP TABLE dead_letters --")


class _CreatesFile:
    """Unpickling this calls open(path, "w"): the file appearing proves the payload ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _body(marker: Path) -> bytes:
    """A Celery protocol-2 body (args, kwargs, embed) as a pickle."""
    return pickle.dumps(((_CreatesFile(marker),), {}, {"callbacks": None, "errbacks": None}))


def _publish_pickle(broker_url: str, body: bytes) -> str:
    """Push a pickle-typed afterwrite.drain message onto the worker's queue."""
    task_id = str(uuid.uuid4())
    headers = {
        "lang": "py",
        "task": "afterwrite.drain",
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "argsrepr": "(<pickle>,)",
        "kwargsrepr": "{}",
        "origin": "faults@attacker",
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
        "shadow": None,
        "ignore_result": True,
    }
    with Connection(broker_url) as conn:  # type: ignore[no-untyped-call]
        conn.Producer().publish(
            body,
            exchange="",
            routing_key="celery",  # the queue the worker consumes
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers=headers,
        )
    return task_id


def test_pickle_message_is_refused_and_sql_kind_names_touch_nothing(
    stack: Stack, launcher: Launcher
) -> None:
    # DEBUG: a task that ran would say so in Celery's per-task lines, checked below
    env = stack.env(log_level="DEBUG")
    launcher.beat(env)
    worker = launcher.worker(env)
    settings = stack.settings(producer_timeout_ms=2000)
    before = record_all(settings, 200, seed=71)
    wait_for(lambda: row_count(stack.database_url) == 200, timeout_s=30, what="200 rows")

    marker_dir = Path(tempfile.mkdtemp(prefix="afterwrite-pickle-"))
    marker = marker_dir / "unpickled"
    try:
        # Control: this payload does create its file when unpickled (so the test can fail).
        control = marker_dir / "control"
        subprocess.run(
            [sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
            input=_body(control),
            check=True,
            timeout=30,
        )
        assert control.exists()

        task_id = _publish_pickle(stack.redis_url, _body(marker))
        wait_for(
            lambda: log_lines(worker.log, r"Refusing to deserialize untrusted content .*pickle"),
            timeout_s=20,
            what="the worker refusing the pickle message",
        )
        assert not log_lines(worker.log, rf"Task afterwrite\.drain\[{task_id}\] (received|succ)")

        sender = Celery("faults-sender", broker=stack.redis_url, set_as_current=False)
        try:
            sender.send_task("afterwrite.drain", args=[HOSTILE_KINDS[0]])
            sender.send_task("afterwrite.reclaim", args=[HOSTILE_KINDS[1]])
        finally:
            sender.close()
        for kind in HOSTILE_KINDS:
            pattern = r"(drain|reclaim) of " + re.escape(kind) + r" stopped .*unknown record kind"

            def failed(pattern: str = pattern) -> list[str]:
                return log_lines(worker.log, pattern)

            wait_for(failed, timeout_s=20, what=f"the task for {kind!r} failing")

        # Still alive and still draining.
        after = record_all(settings, 300, seed=72)
        wait_for(lambda: row_count(stack.database_url) == 500, timeout_s=30, what="500 rows")
        assert worker.alive(), worker.tail()
        assert not marker.exists(), "the pickle payload was executed"
        assert pg_value(stack.database_url, "SELECT to_regclass('query_history')::text")
        assert pg_value(stack.database_url, "SELECT to_regclass('dead_letters')::text")
        assert pg_value(stack.database_url, "SELECT count(*) FROM dead_letters") == 0
        stored = pg_value(stack.database_url, "SELECT array_agg(id::text) FROM query_history")
        assert sorted(stored) == sorted(before + after)
        with redis_conn(stack.redis_url) as r:
            assert not r.keys("*DROP*"), "input reached Redis key names"
    finally:
        shutil.rmtree(marker_dir, ignore_errors=True)
