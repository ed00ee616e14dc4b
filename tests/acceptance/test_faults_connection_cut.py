"""Connection cut: the worker's PostgreSQL connection terminated mid-COPY or at COMMIT, again
and again while it drains a backlog; and its Redis connection cut in the middle of the
acknowledgement. Promise: a retry leaves exactly one copy of every row, and nothing behind.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import psycopg
import pytest

from afterwrite.worker.runtime import Runtime
from tests.faults import (
    GROUP,
    QUERY_STREAM,
    WORKER_APP_PREFIX,
    Launcher,
    Stack,
    TcpProxy,
    assert_exactly_once,
    dead_letter_count,
    pending_ids,
    record_all,
    redis_conn,
    row_count,
)
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance

BACKLOG = 20_000


def test_terminated_database_connections_leave_exactly_one_copy(
    stack: Stack, launcher: Launcher
) -> None:
    ids = record_all(stack.settings(producer_timeout_ms=2000), BACKLOG, seed=41)
    env = stack.env()
    launcher.beat(env)
    worker = launcher.worker(env)
    wait_for(lambda: row_count(stack.database_url) > 0, timeout_s=30, what="a first batch")

    rng = random.Random(3)
    hit: Counter[str] = Counter()  # what the terminated backend was doing

    def in_batch() -> int:
        return sum(n for what, n in hit.items() if what.startswith("in-transaction"))

    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        # At least 4 s of cuts and at least 3 inside a batch: on a busy machine fewer moments
        # land in a batch per second, so the cuts go on longer rather than the test failing.
        started = time.monotonic()
        while time.monotonic() - started < 4 or (
            in_batch() < 3 and time.monotonic() - started < 40
        ):
            # Prefer a moment when a batch is in flight (up to 50 ms), then terminate them all.
            look_until = time.monotonic() + 0.05
            while True:
                backends = conn.execute(
                    "SELECT pid, xact_start IS NOT NULL, state, query FROM pg_stat_activity "
                    "WHERE application_name LIKE %s",
                    (WORKER_APP_PREFIX + "%",),
                ).fetchall()
                if any(b[1] for b in backends) or time.monotonic() > look_until:
                    break
            for pid, in_xact, state, query in backends:
                done = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
                if done and done[0]:
                    verb = (query or "").split(None, 1)[0].upper() if query else "-"
                    hit[f"{'in-transaction' if in_xact else 'idle'} {state} {verb}"] += 1
            time.sleep(rng.uniform(0.1, 0.3))
    print(f"terminated backends: {dict(hit)}")
    assert worker.alive(), worker.tail()
    assert in_batch() >= 3, f"too few terminations landed inside a batch: {dict(hit)}"
    assert row_count(stack.database_url) < BACKLOG, "the backlog drained before the cuts ended"

    def drained() -> bool:
        assert worker.alive(), worker.tail()
        assert dead_letter_count(stack.database_url) == 0, "good rows dead-lettered"
        return row_count(stack.database_url) >= BACKLOG

    wait_for(drained, timeout_s=90, interval_s=0.2, what=f"{BACKLOG} rows")
    time.sleep(1.5)  # later kicks and reclaims must not add anything
    assert_exactly_once(stack.database_url, ids)
    assert dead_letter_count(stack.database_url) == 0, "an outage must not dead-letter good rows"
    with redis_conn(stack.redis_url) as r:
        wait_for(lambda: not pending_ids(r), timeout_s=10, what="no pending entries")


def _resp(*args: str) -> bytes:
    """A command as Redis receives it (RESP array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


def test_cut_between_xack_and_xdel_leaves_no_entry_behind(stack: Stack) -> None:
    ids = record_all(stack.settings(producer_timeout_ms=2000), 1000, seed=43)
    with redis_conn(stack.redis_url) as r:
        entries: Any = r.xrange(QUERY_STREAM)
        entry_ids = [eid.decode() for eid, _ in entries]
    with TcpProxy(stack.redis_port) as proxy:
        rt = Runtime(stack.settings(redis_url=proxy.url(), batch_max_entries=1000))
        try:
            drain = rt.drain("query")
            outcome: dict[str, Any] = {}

            def first_drain() -> None:
                try:
                    outcome["report"] = drain.run(budget_s=30)
                except Exception as exc:
                    outcome["error"] = exc

            thread = threading.Thread(target=first_drain)
            thread.start()
            with redis_conn(stack.redis_url) as r:
                # The batch is read: hold what the drain sends next (its acknowledgement).
                wait_for(lambda: len(pending_ids(r)) == 1000, timeout_s=20, interval_s=0.001)
                proxy.hold(upstream_only=True)
                wait_for(lambda: row_count(stack.database_url) == 1000, timeout_s=20)
                assert len(pending_ids(r)) == 1000, "the acknowledgement was not held"
                # Let XACK through and a few bytes of XDEL, then cut; Redis stays unreachable
                # long enough for the client's retries to give up (as in a partition).
                proxy.refuse(True)
                proxy.cut_after(len(_resp("XACK", QUERY_STREAM, GROUP, *entry_ids)) + 20)
                proxy.release()
                thread.join(60)
                assert not thread.is_alive()
                assert "error" in outcome, outcome
                proxy.refuse(False)

                drain.run(budget_s=30)  # the next drain of the same process
                assert_exactly_once(stack.database_url, ids)
                assert pending_ids(r) == []
                assert r.xlen(QUERY_STREAM) == 0, "acknowledged entries were never deleted"
        finally:
            proxy.release()
            proxy.refuse(False)
            rt.close()
