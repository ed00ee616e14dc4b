"""Broker restart: the private Redis (appendonly yes) is stopped and started again under load,
while the worker drains and a producer records.

Promise: records Redis took during the call (Receipt.outcome SENT) all reach PostgreSQL exactly
once; pending entries survive the restart; the worker process reconnects by itself (it is not
restarted). Records the producer spilled during the outage (Receipt.outcome SPILLED) arrive
too, once its journal is replayed.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from afterwrite.core import wire
from tests.faults import (
    GROUP,
    QUERY_STREAM,
    BackgroundProducer,
    Launcher,
    Stack,
    dead_letter_count,
    pending_ids,
    redis_conn,
    row_count,
    stored_ids,
)
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance

RECORDS = 12_000
OUTAGE_S = 3.0  # longer than the worker's Redis client retries a command (~1-3 s)
HOLDER = "faults-holder"  # a consumer that read entries and stopped, as if it had died


def test_redis_restart_keeps_pending_entries_and_every_acknowledged_record(
    stack: Stack, launcher: Launcher
) -> None:
    env = stack.env()
    beat = launcher.beat(env)
    worker = launcher.worker(env)
    worker_pid = worker.pid
    # Default producer settings (50 ms timeout): calls during the outage spill to a journal,
    # which the producer replays once Redis is back.
    producer = BackgroundProducer(
        stack.settings(), RECORDS, seed=61, rate_per_s=1500, settle_spill_s=30
    ).start()
    try:
        wait_for(lambda: row_count(stack.database_url) > 0, timeout_s=30, what="a first batch")
        held: list[tuple[str, bytes]] = []
        with redis_conn(stack.redis_url) as r:
            # The worker competes for new entries: keep taking until the holder has 200.
            deadline = time.monotonic() + 20
            while len(held) < 200 and time.monotonic() < deadline:
                reply: Any = r.xreadgroup(GROUP, HOLDER, {QUERY_STREAM: ">"}, count=200 - len(held))
                if reply:
                    held += [(eid.decode(), f[wire.PAYLOAD_FIELD]) for eid, f in reply[0][1]]
                time.sleep(0.005)
        assert len(held) == 200
        held_event_ids = {str(wire.decode(payload)["id"]) for _, payload in held}

        stack.services.stop_redis()
        time.sleep(OUTAGE_S)
        stack.start_redis()
        with redis_conn(stack.redis_url) as r:
            # Still pending (under the holder, or under a worker that already reclaimed them).
            assert {eid for eid, _ in held} <= set(pending_ids(r))

        producer.join(timeout_s=90)
        stats = producer.stats
        assert stats["failed"] > 0, f"the producer never saw the outage: {stats}"
        assert stats["dropped"] == 0, stats
        assert stats["replayed"] >= stats["spilled"], f"spill journal not replayed: {stats}"
        acknowledged = set(producer.sent())  # Redis took them during the call
        accepted = set(producer.accepted())  # those plus the spilled ones
        attempted = {str(r) for r in producer.receipts}

        def drained() -> bool:
            assert worker.alive(), worker.tail()
            assert dead_letter_count(stack.database_url) == 0, "good rows dead-lettered"
            assert beat.alive(), beat.tail()
            return accepted <= set(stored_ids(stack.database_url))

        try:
            wait_for(drained, timeout_s=60, interval_s=0.3, what="every accepted record")
        finally:
            stored = set(stored_ids(stack.database_url))
            assert acknowledged <= stored, f"{len(acknowledged - stored)} SENT records lost"
            assert accepted <= stored, f"{len(accepted - stored)} SPILLED records lost"
        time.sleep(1.5)  # later kicks and reclaims must not add anything
        ids = stored_ids(stack.database_url)
        assert len(ids) == len(set(ids)), "duplicate rows"
        # A call that timed out may still have reached Redis: stored ⊆ attempted, not = acked.
        assert set(ids) <= attempted
        # The group's last-delivered id is past them: only a surviving PEL brings them back.
        assert held_event_ids <= set(ids), "the held (pending) entries were lost in the restart"
        assert dead_letter_count(stack.database_url) == 0
        with redis_conn(stack.redis_url) as r:
            wait_for(lambda: not pending_ids(r), timeout_s=10, what="no pending entries")
        assert worker.pid == worker_pid  # reconnected, not restarted
        assert worker.alive()
    finally:
        producer.stop()


def test_start_redis_returns_once_the_aof_is_loaded(stack: Stack) -> None:
    # Enough stream entries that replaying the AOF takes a few hundred milliseconds.
    with redis_conn(stack.redis_url) as r:
        for _ in range(4):
            pipe = r.pipeline(transaction=False)
            for _ in range(50_000):
                pipe.xadd("faults:filler", {b"p": b"x" * 20})
            pipe.execute()
    stack.services.stop_redis()
    stack.services.start_redis()
    conn = redis.Redis.from_url(stack.redis_url, retry=Retry(NoBackoff(), 0))
    try:
        assert conn.ping()
    finally:
        conn.close()
        stack.start_redis()  # wait for it, then let the next test flush it
