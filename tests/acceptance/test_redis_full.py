"""A Redis that fills up, or may evict, never deadlocks the pipeline or loses "sent" records.

Real private Redis (its maxmemory set small by the test), real PostgreSQL, real worker and beat
processes. Promises: producers spill before Redis is full, so the broker and the drains keep
room; a worker and a beat on a Redis that is full anyway stay up and drain it as soon as they
can; a Redis that may evict keys is refused loudly.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from afterwrite.producer import Client, Outcome
from afterwrite.producer.client import redis_options
from afterwrite.worker.operations.health import run_health
from tests.faults import Launcher, Stack, assert_exactly_once, log_lines, stored_ids
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance

MAXMEMORY = 24 * 1024 * 1024


@pytest.fixture
def small_redis(stack: Stack) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(stack.redis_url)
    before: dict[Any, Any] = dict(conn.config_get("maxmemory*"))
    conn.config_set("maxmemory", str(MAXMEMORY))
    conn.config_set("maxmemory-policy", "noeviction")
    try:
        yield conn
    finally:
        conn.config_set("maxmemory", before.get("maxmemory", "0"))
        conn.config_set("maxmemory-policy", before.get("maxmemory-policy", "noeviction"))
        conn.close()


def _used(conn: redis.Redis) -> int:
    return int(conn.info("memory")["used_memory"])


def test_producers_spill_before_redis_is_full_and_draining_frees_it(
    stack: Stack, small_redis: redis.Redis, launcher: Launcher
) -> None:
    settings = stack.settings(
        producer_timeout_ms=2000,
        producer_cap_check_interval_s=0.05,
        redis_memory_high_water=0.6,
    )
    conn = redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings))
    accepted: list[str] = []
    peak = 0
    with Client(conn, settings) as client:
        text = "x" * 1500
        outcomes: dict[Outcome, int] = {}
        while outcomes.get(Outcome.SPILLED, 0) < 200:
            receipt = client.record_query(f"{text} {len(accepted)}", user_id="u")
            outcomes[receipt.outcome] = outcomes.get(receipt.outcome, 0) + 1
            if receipt.accepted:
                accepted.append(str(receipt))
            if len(accepted) % 200 == 0:
                peak = max(peak, _used(small_redis))
            assert len(accepted) < 100_000, "never stopped adding"
        peak = max(peak, _used(small_redis))
        # stopped at the high-water mark, with room left for the broker and the workers
        assert peak < 0.75 * MAXMEMORY, (peak, outcomes)
        assert outcomes.get(Outcome.SENT, 0) > 1000, outcomes
        assert Outcome.DROPPED not in outcomes

        env = stack.env()
        launcher.beat(env)
        launcher.worker(env)
        freed_at = None
        started = time.monotonic()

        def drained() -> bool:
            nonlocal freed_at
            if freed_at is None and _used(small_redis) < 0.5 * MAXMEMORY:
                freed_at = time.monotonic()
            client.flush(1)
            return len(set(_stored(stack)) & set(accepted)) == len(accepted)

        wait_for(drained, timeout_s=180, interval_s=0.5, what="every accepted record stored")
    assert freed_at is not None
    print(f"\nfull → memory below half of maxmemory in {freed_at - started:.1f}s")
    assert_exactly_once(stack.database_url, accepted)


def _stored(stack: Stack) -> list[str]:
    return stored_ids(stack.database_url)


def test_a_worker_and_beat_on_a_full_redis_stay_up_and_drain_when_it_frees(
    stack: Stack, small_redis: redis.Redis, launcher: Launcher
) -> None:
    settings = stack.settings(producer_timeout_ms=2000)
    env = stack.env()
    beat = launcher.beat(env)
    worker = launcher.worker(env)
    conn = redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings))
    with Client(conn, settings) as client:
        first = [str(client.record_query(f"before {i}")) for i in range(50)]
    wait_for(lambda: set(first) <= set(_stored(stack)), timeout_s=60, what="the first records")

    # Kicks wait in the broker's queue (the worker takes them one by one) when someone else's
    # data fills Redis to its limit: every write is refused, taking a task included
    sender = Celery("kicks", broker=stack.redis_url, set_as_current=False)
    try:
        for _ in range(5000):
            sender.send_task("afterwrite.drain", args=["query"])
    finally:
        sender.close()
    i = 0
    try:
        while True:
            small_redis.set(f"other:{i}", "y" * 65536)
            i += 1
    except redis.exceptions.OutOfMemoryError:
        pass
    # ...and stays over it: a popped task message alone must not make room for the next write
    small_redis.config_set("maxmemory", str(MAXMEMORY // 2))
    time.sleep(8)  # beat cannot send, workers cannot be told anything: neither may exit
    assert beat.alive(), beat.tail(3000)
    assert worker.alive(), worker.tail(3000)
    assert not log_lines(worker.log, "Unrecoverable error")

    # Memory comes back: the same processes carry on
    small_redis.config_set("maxmemory", str(MAXMEMORY))
    for key in small_redis.scan_iter("other:*", count=1000):
        small_redis.delete(key)
    with Client(conn, settings) as client:
        later = [str(client.record_query(f"after {i}")) for i in range(50)]
    wait_for(lambda: set(later) <= set(_stored(stack)), timeout_s=90, what="the later records")
    assert_exactly_once(stack.database_url, first + later)


def test_an_evicting_redis_is_refused_by_workers_health_and_producers(
    stack: Stack, small_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    small_redis.config_set("maxmemory-policy", "allkeys-lru")
    settings = stack.settings(producer_timeout_ms=2000, producer_cap_check_interval_s=0.01)

    worker = subprocess.run(
        [str(Path(sys.executable).parent / "afterwrite"), "worker", "--pool", "solo"],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert worker.returncode != 0
    assert "maxmemory-policy allkeys-lru" in worker.stderr + worker.stdout

    report = run_health(settings, worker=False)
    redis_check = next(c for c in report.checks if c.name == "redis")
    assert not redis_check.ok
    assert "allkeys-lru" in redis_check.detail

    conn = redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings))
    with caplog.at_level(logging.ERROR, logger="afterwrite.producer"), Client(conn, settings) as c:
        for i in range(20):
            c.record_query(f"q{i}")
            time.sleep(0.02)
    said = [r for r in caplog.records if "allkeys-lru" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
