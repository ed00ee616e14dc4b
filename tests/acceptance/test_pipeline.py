"""The pipeline as deployed: a real Celery worker and beat as subprocesses, real services."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from afterwrite.core.settings import Settings
from afterwrite.demo import processes, traffic
from afterwrite.producer import Client
from afterwrite.producer.client import redis_options
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance


def test_worker_and_beat_store_every_recorded_query_exactly_once(
    settings: Settings,
    base_env: dict[str, str],
    pg: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    worker = processes.start_worker(base_env, tmp_path, concurrency=2)
    beat = processes.start_beat(base_env, tmp_path)
    client = Client(
        redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings)), settings
    )
    try:
        ids = []
        for kwargs in traffic.queries(20_000, seed=11):
            receipt = client.record_query(**kwargs)
            # The promise is that every accepted id lands exactly once. On a loaded machine a
            # call may outlast the 50 ms producer timeout and spill; the journal replays it.
            assert receipt.accepted, receipt.outcome
            ids.append(str(receipt))

        def stored() -> bool:
            assert worker.alive(), worker.tail()
            assert beat.alive(), beat.tail()
            row = pg.execute("SELECT count(*) FROM query_history").fetchone()
            return row is not None and row[0] >= len(ids)

        wait_for(stored, timeout_s=120, what="20,000 rows")
        time.sleep(1.5)  # one more beat interval: nothing else may arrive
        rows = pg.execute("SELECT id::text, count(*) OVER () FROM query_history").fetchall()
        assert sorted(r[0] for r in rows) == sorted(ids)
        assert pg.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
        stream_len = redis.Redis.from_url(settings.require_redis_url()).xlen(
            f"{settings.stream_prefix}:stream:query"
        )
        assert stream_len == 0  # acknowledged entries are deleted
    finally:
        client.close()
        for p in (beat, worker):
            p.stop()
