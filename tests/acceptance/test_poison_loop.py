"""An entry that kills its consumer every time ends in the dead-letter store after N
deliveries; its batch-mates are stored."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from afterwrite.core import wire
from afterwrite.core.settings import Settings
from afterwrite.demo import processes
from tests.helpers import CRASH_KIND_CREATE_SQL as CREATE_SQL
from tests.helpers import CRASH_KIND_KILL_NOTE as KILL_NOTE
from tests.helpers import CRASH_KIND_TABLE as TABLE
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance


@pytest.fixture
def probe_table(pg: psycopg.Connection[Any]) -> Any:
    pg.execute(CREATE_SQL)
    yield
    pg.execute(f"DROP TABLE {TABLE}")


def test_an_entry_that_crashes_its_consumer_is_dead_lettered_after_n_deliveries(
    settings: Settings,
    base_env: dict[str, str],
    rdb: redis.Redis,
    pg: psycopg.Connection[Any],
    probe_table: None,
    tmp_path: Path,
) -> None:
    env = {
        **base_env,
        "AFTERWRITE_IMPORTS": "tests.crash_kind",
        "AFTERWRITE_MAX_DELIVERIES": "3",
        "AFTERWRITE_BATCH_TIMEOUT_S": "1",
        "AFTERWRITE_RECLAIM_IDLE_S": "2",
        "AFTERWRITE_RECLAIM_INTERVAL_S": "1",
    }
    key = wire.stream_key(settings.stream_prefix, "crash_probe")
    good = [str(uuid.uuid4()) for _ in range(40)]
    killer = str(uuid.uuid4())
    for i, event_id in enumerate(good):
        rdb.xadd(key, {wire.PAYLOAD_FIELD: wire.encode({"id": event_id, "note": f"ok {i}"})})
        if i == 20:
            rdb.xadd(key, {wire.PAYLOAD_FIELD: wire.encode({"id": killer, "note": KILL_NOTE})})

    worker = processes.start_worker(env, tmp_path, concurrency=1)
    beat = processes.start_beat(env, tmp_path)
    try:

        def settled() -> bool:
            assert worker.alive(), worker.tail()  # the pool child dies, the worker does not
            dead = pg.execute("SELECT count(*) FROM dead_letters").fetchone()
            return dead == (1,)

        wait_for(settled, timeout_s=90, what="the killer entry in dead_letters")
        wait_for(
            lambda: pg.execute(f"SELECT count(*) FROM {TABLE}").fetchone() == (len(good),),
            timeout_s=30,
            what="every good entry stored",
        )
    finally:
        beat.stop()
        worker.stop()
    stored = {str(r[0]) for r in pg.execute(f"SELECT id FROM {TABLE}")}
    assert stored == set(good)
    (row,) = pg.execute(
        "SELECT kind, event_id, error_code, delivery_count FROM dead_letters"
    ).fetchall()
    assert row[:3] == ("crash_probe", killer, "too_many_deliveries")
    assert row[3] == 4  # delivered, and claimed back three times, before giving up
    assert "signal 9" in worker.tail(100_000) or "SIGKILL" in worker.tail(100_000)
