"""Worker killed: SIGKILL to the whole worker (main process and pool children) during a large
ingest, again and again, at different moments of a batch; a fresh worker takes over.

Kills land (1) while a batch's COPY streams, before COMMIT; (2) after COMMIT but before
XACK, made certain by holding the worker's Redis traffic in a proxy until PostgreSQL shows the
commit; (3, 4) at plain time offsets after the new worker's first commit. A dead consumer's
pending entries are only ever reclaimed by another consumer (a restarted worker has new
consumer names), so the test also proves reclaim. Promise: every acknowledged id is stored
exactly once, nothing is dead-lettered.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from afterwrite.demo.processes import Process
from afterwrite.worker.ingest.streams import Stream
from afterwrite.worker.runtime import Runtime
from tests.faults import (
    GROUP,
    QUERY_STREAM,
    BackgroundProducer,
    Launcher,
    Stack,
    TcpProxy,
    assert_exactly_once,
    dead_letter_count,
    event_ids_of,
    log_lines,
    payloads,
    pending_ids,
    redis_conn,
    row_count,
    stored_ids,
    worker_backends,
    writing,
    xadd_all,
)
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance

RECORDS = 30_000


def _wait_writing(stack: Stack, worker: Process, *, copying: bool = False) -> None:
    """Until a worker backend is inside a batch (``copying``: streaming its COPY, so that the
    INSERT and the COMMIT are still to come)."""

    def busy() -> bool:
        assert worker.alive(), worker.tail()
        backends = worker_backends(stack.database_url)
        if copying:
            return any(
                b.in_transaction and b.query.lstrip().upper().startswith("COPY") for b in backends
            )
        return any(writing(b) for b in backends)

    wait_for(busy, timeout_s=30, interval_s=0.003, what="a worker batch in progress")


def _wait_commit(stack: Stack, worker: Process) -> None:
    before = row_count(stack.database_url)

    def committed() -> bool:
        assert worker.alive(), worker.tail()
        return row_count(stack.database_url) > before

    wait_for(committed, timeout_s=30, interval_s=0.01, what="the worker's next commit")


def _uncommitted_pending(stack: Stack) -> tuple[set[str], set[str]]:
    """(ids pending and stored, ids pending and not stored)."""
    with redis_conn(stack.redis_url) as r:
        pending = set(event_ids_of(r, pending_ids(r)))
    stored = set(stored_ids(stack.database_url))
    return pending & stored, pending - stored


def test_sigkilled_workers_lose_nothing_and_write_nothing_twice(
    stack: Stack, launcher: Launcher
) -> None:
    started = time.monotonic()
    with TcpProxy(stack.redis_port) as proxy:
        # Streams through the proxy (so XACK can be held), Celery's broker direct.
        env = stack.env(redis_url=proxy.url(), broker_url=stack.redis_url)
        launcher.beat(env)
        worker = launcher.worker(env)
        producer = BackgroundProducer(
            stack.settings(producer_timeout_ms=2000), RECORDS, seed=31, rate_per_s=2500
        ).start()
        try:
            # 1. Mid-batch, before COMMIT: killed while a COPY streams (retried if that batch
            #    still managed to commit in the instant before the kill).
            uncommitted: set[str] = set()
            for _ in range(3):
                _wait_writing(stack, worker, copying=True)
                worker.kill_group()
                _, uncommitted = _uncommitted_pending(stack)
                worker = launcher.worker(env)
                if uncommitted:
                    break
            assert uncommitted, "no kill interrupted an uncommitted batch"

            # 2. After COMMIT, before XACK: the commit is visible in PostgreSQL while the
            #    acknowledgement waits in the proxy.
            committed_unacked: set[str] = set()
            for _ in range(10):
                _wait_writing(stack, worker)
                proxy.hold()
                before = row_count(stack.database_url)
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline and row_count(stack.database_url) == before:
                    time.sleep(0.01)
                if row_count(stack.database_url) > before:
                    time.sleep(0.2)  # the other pool process may commit too
                    worker.kill_group()
                    committed_unacked, _ = _uncommitted_pending(stack)
                    proxy.cut()
                    proxy.release()
                    break
                proxy.release()  # that batch had already been acknowledged; try the next
            assert committed_unacked, "no kill landed between COMMIT and XACK"
            worker = launcher.worker(env)

            # 3, 4. At different moments after a commit of the new worker.
            for delay_s in (0.15, 0.7):
                _wait_commit(stack, worker)
                time.sleep(delay_s)
                worker.kill_group()
                worker = launcher.worker(env)

            producer.join(timeout_s=90)
            sent = producer.sent()
            assert len(sent) == RECORDS, producer.outcomes()

            def drained() -> bool:
                assert worker.alive(), worker.tail()
                assert dead_letter_count(stack.database_url) == 0, "good rows dead-lettered"
                return row_count(stack.database_url) >= len(sent)

            wait_for(drained, timeout_s=90, interval_s=0.2, what=f"{RECORDS} rows")
            time.sleep(1.5)  # a few more kicks and reclaims: nothing else may arrive
            assert_exactly_once(stack.database_url, sent)
            assert dead_letter_count(stack.database_url) == 0
            with redis_conn(stack.redis_url) as r:
                wait_for(lambda: not pending_ids(r), timeout_s=10, what="no pending entries")
            # (The stream's length is not checked here: the proxy hold may split the XACK+XDEL
            # pipeline, which leaves acknowledged entries undeleted; see
            # test_faults_connection_cut.py::test_cut_between_xack_and_xdel_*.)
        finally:
            producer.stop()

    # The entries committed before the kill came back (reclaimed) and were recognised as
    # already stored: ON CONFLICT DO NOTHING, not a second row and not a dead letter. (Not
    # ">= len(committed_unacked)": a later kill between a batch's XACK and its log line hides
    # that batch's count.)
    duplicates = 0
    for log in launcher.log_dir.glob("worker*.log"):
        for line in log_lines(log, r"batch kind=query .*duplicates=\d+"):
            match = re.search(r"duplicates=(\d+)", line)
            assert match is not None
            duplicates += int(match.group(1))
    print(
        f"killed before COMMIT with {len(uncommitted)} entries uncommitted; after COMMIT with "
        f"{len(committed_unacked)} committed, unacknowledged; {duplicates} duplicates skipped"
    )
    assert duplicates > 0
    assert time.monotonic() - started < 150


def test_reclaim_of_many_suspects_stays_within_the_task_time_limit(stack: Stack) -> None:
    """Entries that came back more than once (their consumers were killed) are retried one at
    a time; a large set of them must still fit in one task's time (Celery's soft limit is
    drain_budget_s + batch_timeout_s, then SoftTimeLimitExceeded is raised wherever the task
    is, even inside a psycopg call)."""
    settings = stack.settings(
        batch_max_entries=1000, drain_budget_s=0.5, batch_timeout_s=0.25, reclaim_idle_s=0.5
    )
    soft_limit_s = settings.drain_budget_s + settings.batch_timeout_s
    with redis_conn(stack.redis_url) as r:
        xadd_all(r, payloads(600, seed=37))
        # Read by a consumer that died, claimed by another that died too: delivered twice.
        first = Stream(r, QUERY_STREAM, GROUP, "dead-host:1")
        first.ensure_group()
        entry_ids: list[Any] = [e.id for e in first.read(600)]
        r.xclaim(QUERY_STREAM, GROUP, "dead-host:2", 0, entry_ids)
        time.sleep(settings.reclaim_idle_s + 0.1)

        rt = Runtime(settings)
        try:
            drain = rt.drain("query")
            started = time.monotonic()
            report = drain.reclaim()
            took_s = time.monotonic() - started
            print(f"first reclaim: {report.entries} entries in {took_s:.2f}s")
            while pending_ids(r):  # finish the job in as many reclaims as it takes
                drain.reclaim()
        finally:
            rt.close()
    assert report.entries > 0
    assert row_count(stack.database_url) == 600
    assert dead_letter_count(stack.database_url) == 0
    assert took_s <= soft_limit_s, (
        f"one reclaim took {took_s:.1f}s for {report.entries} suspects; "
        f"the task's soft time limit is {soft_limit_s}s"
    )
