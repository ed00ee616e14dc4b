"""Producer → stream → drain → rows, against real Redis and PostgreSQL."""

from __future__ import annotations

import os
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis

from afterwrite.core import wire
from afterwrite.core.settings import Settings
from afterwrite.producer import Client, Outcome
from afterwrite.producer.client import redis_options
from afterwrite.worker.errors import BadDeployError, Failure, classify
from afterwrite.worker.ingest.streams import Stream
from afterwrite.worker.runtime import Runtime


@pytest.fixture
def client(settings: Settings) -> Client:
    return Client(
        redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings)), settings
    )


@pytest.fixture
def runtime(settings: Settings) -> Any:
    rt = Runtime(settings)
    yield rt
    rt.close()


def _rows(pg: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    cur = pg.cursor(row_factory=psycopg.rows.dict_row)
    return {str(r["id"]): r for r in cur.execute("SELECT * FROM query_history")}


def test_recorded_fields_arrive_exactly(
    client: Client, runtime: Runtime, pg: psycopg.Connection[Any]
) -> None:
    created = datetime(2026, 11, 1, 12, 30, 15, 123456, tzinfo=UTC)
    receipt = client.record_query(
        "What is RAG?",
        response="Retrieval-augmented generation …",
        user_id="u-42",
        session_id="conv-7",
        mode="rag",
        model_ids=["gpt-4o", "claude-3-5-sonnet"],
        response_time_ms=812.5,
        prompt_tokens=431,
        completion_tokens=120,
        retrieval={"chunks": [{"doc": "d1", "score": 0.83}], "top_k": 5},
        metadata={"tenant": "acme", "ünïcode": "✓"},
        created_at=created,
    )
    assert receipt.outcome is Outcome.SENT
    assert uuid.UUID(receipt).version == 7

    report = runtime.drain("query").run(budget_s=5)
    assert (report.entries, report.inserted, report.dead_lettered) == (1, 1, 0)

    row = _rows(pg)[receipt]
    assert row["created_at"] == created
    assert row["query"] == "What is RAG?"
    assert row["response"] == "Retrieval-augmented generation …"
    assert (row["user_id"], row["session_id"], row["mode"]) == ("u-42", "conv-7", "rag")
    assert row["model_ids"] == ["gpt-4o", "claude-3-5-sonnet"]
    assert row["response_time_ms"] == 812.5
    assert (row["prompt_tokens"], row["completion_tokens"]) == (431, 120)
    assert row["retrieval"] == {"chunks": [{"doc": "d1", "score": 0.83}], "top_k": 5}
    assert row["metadata"] == {"tenant": "acme", "ünïcode": "✓"}
    assert row["ingested_at"] >= row["created_at"]
    # acknowledged and deleted from the stream once committed
    assert runtime.redis.xlen(runtime.drain("query").stream.key) == 0


def test_defaults_apply_to_fields_left_out(
    client: Client, runtime: Runtime, pg: psycopg.Connection[Any]
) -> None:
    rid = client.record_query("minimal")
    runtime.drain("query").run(budget_s=5)
    row = _rows(pg)[rid]
    assert row["model_ids"] == []
    assert row["response"] is None
    assert row["metadata"] is None


def test_duplicates_across_and_within_batches_give_one_row(
    client: Client, runtime: Runtime, pg: psycopg.Connection[Any]
) -> None:
    ids = [client.record_query(f"q{i}") for i in range(10)]
    # the same event recorded twice (a client retry) inside one batch
    client.record_query("q0", event_id=ids[0], created_at=None)
    drain = runtime.drain("query")
    first = drain.run(budget_s=5)
    assert first.inserted == 10
    # redelivery of already stored events in a later batch
    for i in range(3):
        client.record_query(f"again{i}", event_id=ids[i])
    second = drain.run(budget_s=5)
    assert (second.entries, second.inserted, second.duplicates) == (3, 0, 3)
    rows = _rows(pg)
    assert sorted(rows) == sorted(ids)
    assert rows[ids[1]]["query"] == "q1"  # first write wins


def test_invalid_entry_is_dead_lettered_while_the_rest_commit(
    client: Client, runtime: Runtime, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    drain = runtime.drain("query")
    good = [client.record_query(f"good {i}") for i in range(50)]
    bad_payloads = {
        "nul": {"id": str(uuid.uuid4()), "created_at": datetime.now(UTC), "query": "a\x00b"},
        "nan": {
            "id": str(uuid.uuid4()),
            "created_at": datetime.now(UTC),
            "query": "x",
            "response_time_ms": float("nan"),
        },
        "type": {"id": str(uuid.uuid4()), "created_at": datetime.now(UTC), "query": 12},
        "missing": {"id": str(uuid.uuid4()), "created_at": datetime.now(UTC)},
        "unknown": {
            "id": str(uuid.uuid4()),
            "created_at": datetime.now(UTC),
            "query": "x",
            "colour": "red",
        },
        "long": {
            "id": str(uuid.uuid4()),
            "created_at": datetime.now(UTC),
            "query": "x",
            "mode": "m" * 65,
        },
    }
    for payload in bad_payloads.values():
        rdb.xadd(drain.stream.key, {wire.PAYLOAD_FIELD: wire.encode(payload)})
    rdb.xadd(drain.stream.key, {wire.PAYLOAD_FIELD: b"\xc1 not msgpack"})
    rdb.xadd(drain.stream.key, {b"other": b"field"})

    report = drain.run(budget_s=5)
    assert report.inserted == 50
    assert report.dead_lettered == 8
    assert sorted(_rows(pg)) == sorted(good)
    codes = {
        r[0]: r[1]
        for r in pg.execute(
            "SELECT event_id, error_code FROM dead_letters WHERE event_id IS NOT NULL"
        )
    }
    expected = {
        "nul": "nul_byte",
        "nan": "not_finite",
        "type": "wrong_type",
        "missing": "missing_field",
        "unknown": "unknown_field",
        "long": "too_long",
    }
    for name, payload in bad_payloads.items():
        assert codes[payload["id"]] == expected[name]
    undecodable = pg.execute(
        "SELECT error_code, payload_raw FROM dead_letters "
        "WHERE event_id IS NULL ORDER BY error_code"
    ).fetchall()
    assert undecodable == [("no_payload", b""), ("undecodable", b"\xc1 not msgpack")]
    assert rdb.xlen(drain.stream.key) == 0


def test_same_poison_seen_twice_is_one_dead_letter(
    runtime: Runtime, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    drain = runtime.drain("query")
    for _ in range(2):
        rdb.xadd(drain.stream.key, {wire.PAYLOAD_FIELD: b"\xc1"})
        drain.run(budget_s=5)
    assert pg.execute("SELECT count(*), max(delivery_count) FROM dead_letters").fetchone() == (1, 2)


def test_database_rejection_is_bisected_to_the_culprit(
    client: Client, runtime: Runtime, pg: psycopg.Connection[Any]
) -> None:
    # A constraint the validator does not know about: only PostgreSQL can reject this row.
    pg.execute("ALTER TABLE query_history ADD CONSTRAINT test_no_seven CHECK (prompt_tokens <> 7)")
    try:
        ids = [client.record_query(f"q{i}", prompt_tokens=100 + i) for i in range(100)]
        culprit = client.record_query("bad", prompt_tokens=7)
        report = runtime.drain("query").run(budget_s=5)
    finally:
        pg.execute("ALTER TABLE query_history DROP CONSTRAINT test_no_seven")
    assert (report.inserted, report.dead_lettered) == (100, 1)
    assert sorted(_rows(pg)) == sorted(ids)
    dead = pg.execute("SELECT event_id, reason, error_code FROM dead_letters").fetchall()
    assert dead == [(culprit, "rejected", "23514")]


def test_entries_recorded_before_any_worker_are_drained(
    client: Client, settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    ids = [client.record_query(f"early {i}") for i in range(5)]
    rt = Runtime(settings)  # group created after the entries exist
    try:
        rt.drain("query").run(budget_s=5)
    finally:
        rt.close()
    assert sorted(_rows(pg)) == sorted(ids)


def test_reclaim_takes_over_a_dead_consumers_entries(
    client: Client,
    settings: Settings,
    runtime: Runtime,
    pg: psycopg.Connection[Any],
    rdb: redis.Redis,
) -> None:
    drain = runtime.drain("query")
    ids = [client.record_query(f"q{i}") for i in range(20)]
    # a consumer that read the entries and died before committing
    dead_consumer = Stream(rdb, drain.stream.key, settings.consumer_group, "dead-host:1")
    assert len(dead_consumer.read(100)) == 20
    assert drain.run(budget_s=5).entries == 0  # nothing new, nothing of ours pending

    # not idle long enough yet: nothing is taken
    assert drain.reclaim().entries == 0
    fast = Runtime(settings.model_copy(update={"reclaim_idle_s": 0.05}))
    try:
        import time

        time.sleep(0.1)
        report = fast.drain("query").reclaim()
    finally:
        fast.close()
    assert (report.entries, report.inserted) == (20, 20)
    assert sorted(_rows(pg)) == sorted(ids)
    assert rdb.xpending(drain.stream.key, settings.consumer_group)["pending"] == 0


def test_drain_continues_while_backlog_and_stops_when_caught_up(
    client: Client, settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    small = Runtime(settings.model_copy(update={"batch_max_entries": 100}))
    try:
        for i in range(450):
            client.record_query(f"q{i}")
        report = small.drain("query").run(budget_s=30)
    finally:
        small.close()
    assert report.batches == 5
    assert report.inserted == 450
    assert pg.execute("SELECT count(*) FROM query_history").fetchone() == (450,)


def test_old_created_at_reports_lag(client: Client, runtime: Runtime) -> None:
    client.record_query("old", created_at=datetime.now(UTC) - timedelta(days=3))
    report = runtime.drain("query").run(budget_s=5)
    assert report.max_lag_s is not None
    assert report.max_lag_s < 60


def test_guard_stops_a_drain_when_nearly_everything_is_invalid(
    client: Client, runtime: Runtime, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    # A producer deployed with the wrong schema: every entry has a field the table lacks.
    drain = runtime.drain("query")
    for i in range(150):
        rdb.xadd(
            drain.stream.key,
            {wire.PAYLOAD_FIELD: wire.encode({"id": str(uuid.uuid4()), "prompt": f"q{i}"})},
        )
    client.record_query("the only good one")
    with pytest.raises(BadDeployError, match="150 of 151 entries"):
        drain.run(budget_s=5)
    # nothing dead-lettered, nothing stored, nothing acknowledged: fix the deploy, then drain
    assert pg.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
    assert pg.execute("SELECT count(*) FROM query_history").fetchone() == (0,)
    assert rdb.xlen(drain.stream.key) == 151
    assert classify(BadDeployError("x")) is Failure.CONFIGURATION


def test_mostly_good_batches_pass_the_guard(
    client: Client, runtime: Runtime, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    drain = runtime.drain("query")
    for i in range(100):
        client.record_query(f"q{i}")
    for _ in range(50):
        rdb.xadd(drain.stream.key, {wire.PAYLOAD_FIELD: b"\xc1"})
    report = drain.run(budget_s=5)
    assert (report.inserted, report.dead_lettered) == (100, 50)


def test_a_vanished_group_is_created_again_and_nothing_is_lost(
    client: Client, runtime: Runtime, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    drain = runtime.drain("query")
    first = [client.record_query(f"before {i}") for i in range(3)]
    assert drain.run(budget_s=5).inserted == 3
    # What a Redis restart without persistence, a FLUSHDB or an eviction policy leaves behind
    rdb.delete(drain.stream.key)
    later = [client.record_query(f"after {i}") for i in range(4)]  # creates the stream, no group
    report = drain.run(budget_s=5)
    assert report.inserted == 4, report
    assert set(_rows(pg)) == {str(r) for r in first + later}
    assert drain.reclaim().entries == 0  # a reclaim on the new group finds nothing and fails not


def test_consumer_names_are_unique_per_process_and_idle_ones_are_forgotten(
    client: Client, runtime: Runtime, rdb: redis.Redis, settings: Settings
) -> None:
    from afterwrite.worker.runtime import consumer_name

    name = consumer_name()
    host, instance, pid = name.split(":")
    assert host == socket.gethostname()
    assert int(pid) == os.getpid()
    assert len(instance) == 8
    assert consumer_name() == name  # stable within the process
    drain = runtime.drain("query")
    key, group = drain.stream.key, settings.consumer_group
    # Two stopped workers: one left nothing pending, one left an entry (a reclaim's business)
    client.record_query("left by a dead worker")
    client.record_query("stored by the other")
    rdb.xreadgroup(group, "old-host:aaaa:7", {key: ">"}, count=1)
    read: Any = rdb.xreadgroup(group, "old-host:bbbb:7", {key: ">"}, count=1)
    rdb.xack(key, group, read[0][1][0][0])
    time.sleep(0.05)
    forgotten = drain.stream.forget_idle_consumers(idle_ms=10)
    assert forgotten == ["old-host:bbbb:7"]
    names = {c["name"] for c in rdb.xinfo_consumers(key, group)}
    assert b"old-host:aaaa:7" in names  # its pending entry is not dropped
    assert b"old-host:bbbb:7" not in names
