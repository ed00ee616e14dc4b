"""Two-stage shutdown of a real worker: SIGTERM finishes the batch in flight at once; a second
SIGTERM abandons it and hands its entries back for immediate reclaim."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from afterwrite.core import wire
from afterwrite.core.settings import Settings
from afterwrite.demo import processes, traffic
from afterwrite.worker.ingest.streams import Stream
from afterwrite.worker.runtime import Runtime
from afterwrite.worker.shutdown import DUPLICATE_WINDOW_S, child_pids
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance

BACKLOG = 60_000


def _preload(rdb: redis.Redis, settings: Settings, count: int) -> None:
    key = wire.stream_key(settings.stream_prefix, "query")
    pipe = rdb.pipeline(transaction=False)
    for i, kwargs in enumerate(traffic.queries(count, seed=5)):
        pipe.xadd(key, {wire.PAYLOAD_FIELD: wire.encode(traffic.as_record(kwargs))})
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()


def _batch_holder(rdb: redis.Redis, key: str, group: str) -> int | None:
    """The pid of the consumer with entries pending (consumer names end in ``:pid``)."""
    for consumer in rdb.xpending(key, group)["consumers"]:
        if int(consumer["pending"]) > 0:
            name = consumer["name"]
            return int((name.decode() if isinstance(name, bytes) else name).rsplit(":", 1)[1])
    return None


def _rows(pg: psycopg.Connection[Any]) -> int:
    row = pg.execute("SELECT count(*) FROM query_history").fetchone()
    return int(row[0]) if row else 0


@pytest.fixture
def long_drain_env(base_env: dict[str, str]) -> dict[str, str]:
    # A drain that would keep going for a minute: shutdown must not wait for it.
    return {**base_env, "AFTERWRITE_DRAIN_BUDGET_S": "60", "AFTERWRITE_BATCH_MAX_ENTRIES": "5000"}


def test_sigterm_finishes_the_batch_in_flight_and_exits_at_once(
    settings: Settings,
    long_drain_env: dict[str, str],
    rdb: redis.Redis,
    pg: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    _preload(rdb, settings, BACKLOG)
    worker = processes.start_worker(long_drain_env, tmp_path, concurrency=1)
    beat = processes.start_beat(long_drain_env, tmp_path)
    try:
        wait_for(lambda: _rows(pg) > 0, timeout_s=60, what="the drain to start")
        beat.stop()  # no new kicks: only the drain in progress
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)  # main process only, as docker/k8s do
        worker.proc.wait(timeout=30)
        exit_s = time.monotonic() - started
    finally:
        beat.stop()
        worker.stop()
    key = wire.stream_key(settings.stream_prefix, "query")
    stored, left = _rows(pg), int(rdb.xlen(key))
    assert exit_s < 5, f"worker took {exit_s:.1f}s to stop"
    assert stored < BACKLOG, "the drain should have stopped early, not used its budget"
    # the batch in flight was finished: committed and acknowledged, nothing left pending
    assert rdb.xpending(key, settings.consumer_group)["pending"] == 0
    assert stored + left == BACKLOG


def test_second_sigterm_abandons_the_batch_and_hands_it_back(
    settings: Settings,
    long_drain_env: dict[str, str],
    rdb: redis.Redis,
    pg: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    _preload(rdb, settings, BACKLOG)
    env = {**long_drain_env, "AFTERWRITE_BATCH_MAX_ENTRIES": "50000"}  # seconds per batch
    key = wire.stream_key(settings.stream_prefix, "query")
    Stream(rdb, key, settings.consumer_group, "test").ensure_group()
    worker = processes.start_worker(env, tmp_path, concurrency=1)
    beat = processes.start_beat(env, tmp_path)
    try:
        wait_for(lambda: child_pids(worker.pid), timeout_s=30, what="pool child")
        # Signal the process that holds the batch, named by its consumer in the group: the
        # pool child seen at start may have been replaced before it took one.
        child = wait_for(
            lambda: _batch_holder(rdb, key, settings.consumer_group),
            timeout_s=60,
            interval_s=0.01,
            what="a batch in flight",
        )
        assert child in child_pids(worker.pid)
        os.kill(child, signal.SIGTERM)
        time.sleep(DUPLICATE_WINDOW_S + 0.1)  # a second request, not the same one twice
        os.kill(child, signal.SIGTERM)
        time.sleep(1)
    finally:
        beat.stop()
        worker.stop()
    # Whatever was in flight is reclaimable now, with the default 120 s idle threshold.
    pending = rdb.xpending_range(key, settings.consumer_group, "-", "+", 100_000)
    idle_ms = settings.reclaim_idle_s * 1000
    fresh = [p for p in pending if int(p["time_since_delivered"]) < idle_ms]
    assert not fresh, f"{len(fresh)} of {len(pending)} not handed back, e.g. {fresh[:1]}"
    rt = Runtime(settings)
    try:
        drain = rt.drain("query")
        reclaimed = 0
        while batch := drain.reclaim().entries:
            reclaimed += batch
        assert reclaimed == len(pending)
        while drain.run(budget_s=30).entries:
            pass
    finally:
        rt.close()
    ids = pg.execute("SELECT count(*), count(DISTINCT id) FROM query_history").fetchone()
    assert ids == (BACKLOG, BACKLOG)


def test_sigterm_to_the_whole_group_still_finishes_the_batch(
    settings: Settings,
    long_drain_env: dict[str, str],
    rdb: redis.Redis,
    pg: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    # systemd (KillMode=control-group) and `kill -- -PGID` signal every process: the child
    # gets SIGTERM directly and again forwarded by the main process, which is one request.
    _preload(rdb, settings, BACKLOG)
    worker = processes.start_worker(long_drain_env, tmp_path, concurrency=1)
    beat = processes.start_beat(long_drain_env, tmp_path)
    try:
        wait_for(lambda: _rows(pg) > 0, timeout_s=60, what="the drain to start")
        beat.stop()
        worker.kill_group(signal.SIGTERM)
        worker.proc.wait(timeout=30)
    finally:
        beat.stop()
        worker.stop()
    key = wire.stream_key(settings.stream_prefix, "query")
    assert "abandoning" not in worker.tail(100_000)
    assert rdb.xpending(key, settings.consumer_group)["pending"] == 0
    assert _rows(pg) + int(rdb.xlen(key)) == BACKLOG
