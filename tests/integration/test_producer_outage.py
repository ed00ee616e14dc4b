"""Redis stopped while producers record: calls stay within budget, entries spill to disk, and
are replayed when Redis is back; after a drain every id is in PostgreSQL exactly once.

A private Redis (``afterwrite.demo.services.PrivateServices``) is stopped and started on the same
port; PostgreSQL is the shared test database.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
import redis.asyncio as aioredis

from afterwrite.core.settings import Settings
from afterwrite.demo.services import PrivateServices
from afterwrite.producer import AsyncClient, Client, Outcome, Receipt
from afterwrite.producer.client import redis_options
from afterwrite.spill.files import SUFFIX
from afterwrite.worker.runtime import Runtime
from tests.helpers import wait_for

BUDGET_S = 0.100
"""A behaviour bound (Redis refuses at once when stopped), not a performance target."""


@pytest.fixture
def private_redis() -> Iterator[PrivateServices]:
    # Not pytest's tmp_path: PrivateServices' data dir must be reachable by other users.
    data = Path(tempfile.mkdtemp(prefix="afterwrite-producer-"))
    data.chmod(0o755)
    services = PrivateServices(data, postgres=False, redis=True)
    services.start()
    try:
        yield services
    finally:
        services.stop()
        shutil.rmtree(data, ignore_errors=True)


def outage_settings(
    settings: Settings, services: PrivateServices, spill_dir: Path, **update: Any
) -> Settings:
    return settings.model_copy(
        update={
            "redis_url": services.start_redis(),  # already running: just its URL
            "spill_dir": spill_dir,
            "spill_replay_interval_s": 0.1,
            **update,
        }
    )


def spill_files(spill_dir: Path) -> list[Path]:
    return list(spill_dir.rglob(f"*{SUFFIX}"))


def drain_until_stored(settings: Settings, pg: psycopg.Connection[Any], count: int) -> list[str]:
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


@pytest.mark.parametrize("mode", ["direct", "background"])
def test_outage_spills_within_budget_and_replays_exactly_once(
    mode: str,
    settings: Settings,
    private_redis: PrivateServices,
    pg: psycopg.Connection[Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "afterwrite.producer")
    s = outage_settings(settings, private_redis, tmp_path, producer_mode=mode)
    client = Client.from_env(s)
    receipts: list[Receipt] = []
    durations: list[float] = []
    stop = threading.Event()

    def request_handler() -> None:
        i = 0
        while not stop.is_set():
            started = time.perf_counter()
            receipt = client.record_query(f"question {i}", response="an answer " * 50)
            durations.append(time.perf_counter() - started)
            receipts.append(receipt)
            i += 1
            time.sleep(0.0002)

    thread = threading.Thread(target=request_handler)
    thread.start()
    try:
        wait_for(lambda: len(receipts) >= 500, what="records before the outage")
        private_redis.stop_redis()
        wait_for(lambda: client.stats.snapshot()["spilled"] >= 2000, what="spills while down")
        assert spill_files(tmp_path)
        private_redis.start_redis()
        at_restart = len(receipts)
        wait_for(lambda: len(receipts) >= at_restart + 500, what="records after the outage")
        stop.set()
        thread.join(30)
        assert client.flush(10)

        def replayed_all() -> bool:
            snap = client.stats.snapshot()
            return snap["replayed"] == snap["spilled"] and not spill_files(tmp_path)

        wait_for(replayed_all, what="automatic replay")
    finally:
        stop.set()
        thread.join(30)
        client.close()

    # No call waits on the dead Redis. A thread of a busy machine is sometimes descheduled for
    # longer than the budget: a few slow calls in thousands is that, not waiting.
    slow = sorted(d for d in durations if d >= BUDGET_S)
    assert len(slow) <= max(2, len(durations) // 1000), f"{len(slow)} calls over budget: {slow}"
    snap = client.stats.snapshot()
    assert snap["recorded"] == len(receipts)
    assert snap["dropped"] == 0
    assert snap["spilled"] > 0
    assert snap["replayed"] == snap["spilled"]
    assert snap["sent"] + snap["spilled"] == len(receipts)
    assert snap["failed"] == snap["spilled"]
    outcomes = {r.outcome for r in receipts}
    if mode == "direct":
        assert outcomes == {Outcome.SENT, Outcome.SPILLED}
    else:  # buffered; spilled by the caller itself only when the buffer was full
        assert Outcome.BUFFERED in outcomes
        assert outcomes <= {Outcome.BUFFERED, Outcome.SPILLED}
    # Quiet hot path: one line per outage, not one per call.
    messages = [r.getMessage() for r in caplog.records]
    assert sum("redis unavailable" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1
    assert sum(m.startswith("spilling to") for m in messages) == 1

    ids = drain_until_stored(s, pg, len(receipts))
    assert len(ids) == len(set(ids))  # exactly once, even for entries both in Redis and spilled
    assert sorted(ids) == sorted(str(r) for r in receipts)


def test_async_client_spills_and_replays_after_an_outage(
    settings: Settings,
    private_redis: PrivateServices,
    pg: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    s = outage_settings(settings, private_redis, tmp_path)

    async def scenario() -> tuple[list[Receipt], list[float], dict[str, int]]:
        conn = aioredis.Redis.from_url(s.require_redis_url(), **redis_options(s, asyncio=True))
        async with AsyncClient(conn, s) as client:
            receipts = [await client.record_query(f"before {i}") for i in range(100)]
            private_redis.stop_redis()
            durations = []
            for i in range(300):
                started = time.perf_counter()
                receipts.append(await client.record_query(f"during {i}"))
                durations.append(time.perf_counter() - started)
            private_redis.start_redis()
            receipts += [await client.record_query(f"after {i}") for i in range(100)]
            deadline = time.monotonic() + 30
            while spill_files(tmp_path) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the replay task runs on this loop
            return receipts, durations, client.stats.snapshot()

    receipts, durations, snap = asyncio.run(scenario())
    slow = sorted(d for d in durations if d >= BUDGET_S)  # as above: a pause, not a wait
    assert len(slow) <= 2, f"{len(slow)} of 300 calls over budget: {slow}"
    assert not spill_files(tmp_path)
    assert snap["spilled"] >= 300
    assert snap["replayed"] == snap["spilled"]
    assert snap["dropped"] == 0
    assert sum(r.outcome is Outcome.SPILLED for r in receipts) == snap["spilled"]
    ids = drain_until_stored(s, pg, len(receipts))
    assert sorted(ids) == sorted(str(r) for r in receipts)


def test_a_new_process_replays_what_a_killed_one_spilled(
    settings: Settings,
    private_redis: PrivateServices,
    pg: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    """Spilled while Redis was down by a process that then died (SIGKILL: no atexit, no close);
    a later client on the same spill directory replays it."""
    s = outage_settings(settings, private_redis, tmp_path)
    private_redis.stop_redis()
    code = f"""
import os, signal, sys
from afterwrite.core.settings import load_settings
from afterwrite.producer import Client, Outcome
s = load_settings({{}}, redis_url={s.redis_url!r}, spill_dir={str(tmp_path)!r})
client = Client.from_env(s)
for i in range(1000):
    r = client.record_query(f"spilled {{i}}")
    assert r.outcome is Outcome.SPILLED, r.outcome
    print(r, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == -9, proc.stderr
    spilled = proc.stdout.split()
    assert len(spilled) == 1000
    private_redis.start_redis()
    with Client.from_env(s) as client:  # finds the leftovers at start
        wait_for(lambda: not spill_files(tmp_path), what="replay of the dead process's spill")
        assert client.stats.snapshot()["replayed"] == 1000
    ids = drain_until_stored(s, pg, 1000)
    assert sorted(ids) == sorted(spilled)
    assert redis.Redis.from_url(s.require_redis_url()).xlen("afterwrite:stream:query") == 0


@pytest.mark.parametrize("mode", ["direct", "background"])
def test_a_hung_redis_costs_a_call_at_most_its_timeout_then_entries_spill(
    mode: str, settings: Settings, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """Redis accepts connections but does not answer (a proxy holds the bytes): slower than
    the call's budget counts as unavailable."""
    from tests.faults import TcpProxy

    upstream = urlsplit(settings.require_redis_url())
    assert upstream.port is not None
    with TcpProxy(upstream.port) as proxy:
        s = settings.model_copy(
            update={
                "redis_url": proxy.url(path=upstream.path),
                "producer_mode": mode,
                "spill_dir": tmp_path,
                "spill_replay_interval_s": 0.1,
            }
        )
        receipts: list[Receipt] = []
        durations: list[float] = []
        with Client.from_env(s) as client:
            receipts += [client.record_query(f"before {i}") for i in range(50)]
            assert client.flush(5)
            proxy.hold()
            deadline = time.monotonic() + 2.5  # spans a reopening of the gate
            while time.monotonic() < deadline:
                started = time.perf_counter()
                receipts.append(client.record_query("while hung"))
                durations.append(time.perf_counter() - started)
                time.sleep(0.001)
            assert client.flush(5)
            assert client.stats.snapshot()["spilled"] > 0
            proxy.release()
            wait_for(
                lambda: client.stats.snapshot()["replayed"] == client.stats.snapshot()["spilled"],
                what="replay after the hang",
            )
            snap = client.stats.snapshot()
    timeout_s = s.producer_timeout_ms / 1000
    # Background calls do no I/O and direct ones are cut at the timeout, so a call over the
    # budget is a pause of the whole machine (a fresh-clone CI run once saw one of 168 ms in
    # background mode): one is tolerated, a pattern is not, and nothing may come near a hang.
    over = sorted(d for d in durations if d >= 2 * timeout_s + 0.05)
    assert len(over) <= 1, f"{len(over)} of {len(durations)} calls over budget: {over}"
    assert max(durations) < 1.0, f"slowest call {max(durations) * 1000:.1f} ms"
    assert snap["dropped"] == 0
    assert snap["failed"] == snap["spilled"]
    # Entries held in the proxy may reach Redis too: stored once all the same.
    ids = drain_until_stored(settings, pg, len(receipts))
    assert sorted(ids) == sorted(str(r) for r in receipts)
