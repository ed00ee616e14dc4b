"""Background mode against real Redis and PostgreSQL: delivery, flush, exit, overflow, limits."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import redis

from afterwrite.core.settings import Settings
from afterwrite.demo import traffic
from afterwrite.producer import Client, Outcome
from afterwrite.worker.runtime import Runtime
from tests.faults import TcpProxy
from tests.helpers import wait_for

STREAM = "afterwrite:stream:query"


def stored_ids(settings: Settings, pg: psycopg.Connection[Any], count: int) -> list[str]:
    runtime = Runtime(settings)
    try:

        def stored() -> bool:
            runtime.drain("query").run(budget_s=5)
            row = pg.execute("SELECT count(*) FROM query_history").fetchone()
            return row is not None and row[0] >= count

        wait_for(stored, timeout_s=60, what=f"{count} rows")
    finally:
        runtime.close()
    return [r[0] for r in pg.execute("SELECT id::text FROM query_history").fetchall()]


def test_ten_thousand_records_flush_into_the_stream_and_arrive_once(
    settings: Settings, rdb: redis.Redis, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    s = settings.model_copy(update={"producer_mode": "background", "spill_dir": tmp_path})
    with Client.from_env(s) as client:
        assert client.mode == "background"
        receipts = [client.record_query(**kw) for kw in traffic.queries(10_000, seed=5)]
        assert client.flush(30)
        snap = client.stats.snapshot()
        # Handed over: each one in Redis, or (buffer full in a burst) spilled and replayed soon.
        assert snap["sent"] + snap["spilled"] == 10_000
        assert snap["buffered"] == 0
        assert snap["dropped"] == 0
        wait_for(lambda: client.stats.snapshot()["replayed"] == snap["spilled"], what="replay")
        assert rdb.xlen(STREAM) == 10_000
    outcomes = {r.outcome for r in receipts}
    assert outcomes <= {Outcome.BUFFERED, Outcome.SPILLED}
    ids = stored_ids(s, pg, 10_000)
    assert len(ids) == 10_000
    assert sorted(ids) == sorted(str(r) for r in receipts)


def test_flush_waits_for_batches_a_long_interval_would_hold_back(
    settings: Settings, rdb: redis.Redis, tmp_path: Path
) -> None:
    s = settings.model_copy(
        update={
            "producer_mode": "background",
            "spill_dir": tmp_path,
            "producer_flush_interval_ms": 60_000.0,
        }
    )
    with Client.from_env(s) as client:
        for i in range(10):
            client.record_query(f"q{i}")
        assert rdb.xlen(STREAM) == 0  # not due yet: 10 entries, a minute to wait
        assert client.flush(5)
        assert rdb.xlen(STREAM) == 10


def test_a_full_buffer_spills_at_once_instead_of_waiting(
    settings: Settings, rdb: redis.Redis, tmp_path: Path
) -> None:
    db = urlsplit(settings.require_redis_url()).path or "/0"
    port = rdb.connection_pool.connection_kwargs["port"]
    with TcpProxy(port) as proxy:
        s = settings.model_copy(
            update={
                "redis_url": proxy.url(path=db),
                "producer_mode": "background",
                "spill_dir": tmp_path,
                "producer_buffer_max_entries": 100,
                "producer_flush_max_entries": 100,
                "producer_flush_interval_ms": 60_000.0,
                "producer_timeout_ms": 30_000.0,  # the held batch waits; nothing times out
                "spill_replay_interval_s": 0.1,
            }
        )
        with Client.from_env(s) as client:
            # Redis answers nothing: the first full batch is sent and stays in flight, so the
            # buffer stays full and every later call spills by itself rather than wait.
            proxy.hold()
            started = time.monotonic()
            receipts = [client.record_query(f"q{i}") for i in range(300)]
            assert time.monotonic() - started < 10, "calls waited for the held batch"
            assert receipts[0].outcome is Outcome.BUFFERED
            assert receipts[-1].outcome is Outcome.SPILLED
            proxy.release()
            assert client.flush(20)
            wait_for(lambda: rdb.xlen(STREAM) == 300, what="all 300 in the stream")
            wait_for(
                lambda: client.stats.snapshot()["replayed"] == client.stats.snapshot()["spilled"],
                what="every spilled record replayed",
            )
            snap = client.stats.snapshot()
            assert snap["buffer_full"] == snap["spilled"] == snap["replayed"] > 0
            assert snap["sent"] + snap["spilled"] == 300


def test_records_buffered_at_exit_are_flushed_by_the_atexit_hook(
    settings: Settings, rdb: redis.Redis, tmp_path: Path
) -> None:
    code = f"""
from afterwrite.core.settings import load_settings
from afterwrite.producer import Client
s = load_settings(
    {{}},
    redis_url={settings.redis_url!r},
    spill_dir={str(tmp_path)!r},
    producer_mode="background",
    producer_flush_interval_ms=60000,
)
client = Client.from_env(s)
for i in range(500):
    print(client.record_query(f"at exit {{i}}"))
# no flush, no close: the interpreter exits normally
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert rdb.xlen(STREAM) == 500
    assert not list(tmp_path.rglob("*.awspill"))


def test_a_full_journal_drops_new_records_and_counts_them(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = settings.model_copy(
        update={
            "redis_url": "redis://127.0.0.1:1/0",  # nothing listens: every record spills
            "spill_dir": tmp_path,
            "spill_max_bytes": 1024 * 1024,
        }
    )
    with Client.from_env(s) as client:
        receipts = [client.record_query(f"q{i}", response="x" * 2000) for i in range(1000)]
        snap = client.stats.snapshot()
    outcomes = [r.outcome for r in receipts]
    spilled = outcomes.count(Outcome.SPILLED)
    assert outcomes == [Outcome.SPILLED] * spilled + [Outcome.DROPPED] * (1000 - spilled)
    assert 300 < spilled < 600  # about 1 MiB of 2 KB records
    assert (snap["spilled"], snap["dropped"], snap["failed"]) == (spilled, 1000 - spilled, 1000)
    used = sum(p.stat().st_size for p in tmp_path.rglob("*.awspill"))
    assert used <= 1024 * 1024
    full = [r for r in caplog.records if "dropping new entries" in r.getMessage()]
    assert len(full) == 1  # logged once, not per dropped record


def test_spilling_can_be_disabled(settings: Settings, tmp_path: Path) -> None:
    s = settings.model_copy(
        update={"redis_url": "redis://127.0.0.1:1/0", "spill_dir": tmp_path, "spill_max_bytes": 0}
    )
    with Client.from_env(s) as client:
        assert client.record_query("lost").outcome is Outcome.DROPPED
        assert client.stats.snapshot()["dropped"] == 1
    assert not any(tmp_path.iterdir())


def test_invalid_records_are_reported_not_raised(settings: Settings, tmp_path: Path) -> None:
    s = settings.model_copy(update={"producer_mode": "background", "spill_dir": tmp_path})
    with Client.from_env(s) as client:
        assert client.record_query("bad \ud800 surrogate").outcome is Outcome.INVALID
        assert client.stats.snapshot()["invalid"] == 1


def test_logging_is_quiet_when_nothing_goes_wrong(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "afterwrite")
    s = settings.model_copy(update={"producer_mode": "background", "spill_dir": tmp_path})
    with Client.from_env(s) as client:
        for i in range(100):
            client.record_query(f"q{i}")
        assert client.flush(5)
    assert [r.getMessage() for r in caplog.records] == []


def test_batch_sender_sends_each_kind_to_its_stream_and_caps_each(rdb: redis.Redis) -> None:
    from afterwrite.producer.gate import Gate
    from afterwrite.producer.sender import BatchSender

    gate = Gate(max_entries=3, cap_check_interval_s=60.0)
    sender = BatchSender(rdb, gate, prefix="afterwrite", max_entries=3)
    items = [("query", b"q1"), ("metric", b"m1"), ("query", b"q2"), ("query", b"q3")]
    assert sender.send(items) == [Outcome.SENT] * 4
    more = [("metric", b"m2"), ("query", b"q4"), ("metric", b"m3"), ("metric", b"m4")]
    assert sender.send(more) == [Outcome.SENT, Outcome.OVER_CAP, Outcome.SENT, Outcome.OVER_CAP]
    assert rdb.xlen(STREAM) == 3
    assert rdb.xlen("afterwrite:stream:metric") == 3
    # Over its cap, a stream is not even tried again until the next cap check.
    assert sender.send([("query", b"q5")]) == [Outcome.OVER_CAP]
    assert sender.send([("metric", b"m5")]) == [Outcome.OVER_CAP]


def test_direct_mode_runs_no_thread_until_it_has_something_to_replay(
    settings: Settings, tmp_path: Path
) -> None:
    import threading

    def producer_threads() -> int:
        return sum(t.name == "afterwrite-producer" for t in threading.enumerate())

    before = producer_threads()
    with Client.from_env(settings.model_copy(update={"spill_dir": tmp_path})) as client:
        for i in range(20):
            assert client.record_query(f"q{i}").outcome is Outcome.SENT
        assert producer_threads() == before
    down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0", "spill_dir": tmp_path})
    with Client.from_env(down) as client:
        assert client.record_query("spilled").outcome is Outcome.SPILLED
        assert producer_threads() == before + 1  # started to replay it later
    assert producer_threads() == before  # stopped by close()
