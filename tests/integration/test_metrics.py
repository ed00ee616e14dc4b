"""Metric points → drain → exact rollups and quantiles, against real Redis and PostgreSQL."""

from __future__ import annotations

import json
import math
import random
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis
from psycopg.types.json import Jsonb

from afterwrite.core import wire
from afterwrite.core.ids import uuid7_str
from afterwrite.core.settings import Settings, load_settings
from afterwrite.core.sketch import ALPHA, Sketch
from afterwrite.demo.services import Endpoints
from afterwrite.models.metric import BUCKET_S
from afterwrite.models.registry import kinds
from afterwrite.producer import Client
from afterwrite.worker.ingest.database import Database
from afterwrite.worker.ingest.drain import DrainReport, KindDrain
from afterwrite.worker.ingest.streams import Stream
from afterwrite.worker.operations.metric_rollups import summary
from afterwrite.worker.runtime import Runtime, worker_redis

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)  # a bucket boundary

Key = tuple[str, str, datetime]  # name, tags as canonical JSON, bucket start


@pytest.fixture(autouse=True)
def clean_rollups(pg: psycopg.Connection[Any]) -> Iterator[None]:
    # conftest truncates the kinds' tables; the rollups table is no kind's.
    pg.execute("TRUNCATE metric_rollups")
    yield
    pg.execute("TRUNCATE metric_rollups")


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings)
    yield rt
    rt.close()


def _point(
    name: str, value: float, tags: dict[str, str] | None = None, ts: datetime = T0
) -> dict[str, Any]:
    """What ``record_metric(name, value, tags, ts)`` sends."""
    payload: dict[str, Any] = {"id": uuid7_str(), "created_at": ts, "name": name, "value": value}
    if tags is not None:
        payload["tags"] = tags
    return payload


def _xadd(rdb: redis.Redis, key: str, payloads: Sequence[dict[str, Any] | bytes]) -> list[bytes]:
    encoded = [p if isinstance(p, bytes) else wire.encode(p) for p in payloads]
    pipe = rdb.pipeline(transaction=False)
    for raw in encoded:
        pipe.xadd(key, {wire.PAYLOAD_FIELD: raw})
    pipe.execute()
    return encoded


def _bucket(ts: datetime) -> datetime:
    epoch_s = int(ts.timestamp())
    return datetime.fromtimestamp(epoch_s - epoch_s % BUCKET_S, UTC)


def _canon(tags: dict[str, str] | None) -> str:
    return json.dumps(tags or {}, sort_keys=True)


def _expected(points: Sequence[dict[str, Any]]) -> dict[Key, list[float]]:
    groups: dict[Key, list[float]] = {}
    for p in points:
        key = (p["name"], _canon(p.get("tags")), _bucket(p["created_at"]))
        groups.setdefault(key, []).append(p["value"])
    return groups


def _rollups(pg: psycopg.Connection[Any]) -> dict[Key, tuple[int, float, float, float, Sketch]]:
    rows = pg.execute(
        "SELECT name, tags, bucket_s, bucket_start, count, sum, min, max, sketch "
        "FROM metric_rollups"
    ).fetchall()
    assert all(r[2] == BUCKET_S for r in rows)
    return {
        (r[0], _canon(r[1]), r[3]): (r[4], r[5], r[6], r[7], Sketch.from_json(r[8])) for r in rows
    }


def _assert_exact(pg: psycopg.Connection[Any], points: Sequence[dict[str, Any]]) -> None:
    expected = _expected(points)
    got = _rollups(pg)
    assert sorted(got) == sorted(expected)
    for key, values in expected.items():
        count, total, lo, hi, sketch = got[key]
        # values are multiples of 1/4 well inside 2**53: float sums are exact in any order
        assert (count, total, lo, hi) == (len(values), sum(values), min(values), max(values))
        assert sketch == Sketch().extend(values), key  # built in SQL == built in Python


def _mixed(r: random.Random, n: int) -> list[dict[str, Any]]:
    names = ["llm.latency_ms", "llm.tokens", "rag.score_delta"]
    tag_sets: list[dict[str, str] | None] = [
        None,
        {"model": "gpt-4o"},
        {"model": "gpt-4o", "region": "eu"},
        {"model": "claude", "region": "eu"},
    ]
    points = []
    for _ in range(n):
        value = r.choice([0.0, r.randint(-4000, 400_000) / 4, r.randint(1, 50)])
        ts = T0 + timedelta(seconds=r.uniform(0, 5 * BUCKET_S))
        tags = r.choice(tag_sets)
        points.append(_point(r.choice(names), value, None if tags is None else dict(tags), ts))
    return points


def test_a_drain_rolls_points_up_exactly(
    runtime: Runtime, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    points = _mixed(random.Random(1), 3000)
    # the same tag set in another key order is the same series
    points.append(_point("llm.tokens", 8.0, {"region": "eu", "model": "gpt-4o"}))
    drain = runtime.drain("metric")
    _xadd(rdb, drain.stream.key, points)
    report = drain.run(budget_s=10)
    assert (report.entries, report.inserted, report.dead_lettered) == (3001, 3001, 0)
    _assert_exact(pg, points)
    # raw points are kept too, tags defaulting to {}
    assert pg.execute("SELECT count(*) FROM metric_points WHERE tags = '{}'").fetchone() == (
        sum(1 for p in points if p.get("tags") is None),
    )


def test_the_generic_client_path(settings: Settings, runtime: Runtime, pg: Any) -> None:
    client = Client.from_env(settings)
    try:
        event_id = client.record(
            "metric", {"name": "x", "value": 2.5, "tags": {"a": "b"}, "created_at": T0}
        )
    finally:
        client.close()
    assert runtime.drain("metric").run(budget_s=5).inserted == 1
    assert pg.execute("SELECT id::text FROM metric_points").fetchone() == (event_id,)
    assert pg.execute("SELECT count, sum FROM metric_rollups").fetchone() == (1, 2.5)


def test_redelivered_points_change_no_rollup(
    runtime: Runtime, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    points = _mixed(random.Random(2), 1000)
    drain = runtime.drain("metric")
    raw = _xadd(rdb, drain.stream.key, points)
    drain.run(budget_s=10)
    before = _rollups(pg)
    # the same entries again, as after a commit whose XACK was lost, plus one new point
    extra = _point("llm.tokens", 1.0, {"model": "gpt-4o"})
    _xadd(rdb, drain.stream.key, [*raw, extra])
    again = drain.run(budget_s=10)
    assert (again.inserted, again.duplicates) == (1, 1000)
    _assert_exact(pg, [*points, extra])
    after = _rollups(pg)
    changed = [k for k in after if after[k] != before.get(k)]
    assert changed == [("llm.tokens", _canon({"model": "gpt-4o"}), T0)]


def _own_drain(settings: Settings, consumer: str) -> KindDrain:
    stream = Stream(
        worker_redis(settings.require_redis_url()),
        wire.stream_key(settings.stream_prefix, "metric"),
        settings.consumer_group,
        consumer,
    )
    stream.ensure_group()
    db = Database(
        settings.require_database_url(), statement_timeout_s=30, application_name=consumer
    )
    return KindDrain(kinds.get("metric"), stream, db, settings)


def _in_threads(*jobs: Any) -> list[Any]:
    """Run the callables at the same moment, each in its own thread; re-raise any failure."""
    barrier = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = jobs[i]()
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_concurrent_drains_upserting_the_same_buckets_are_exact(
    endpoints: Endpoints, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    # small batches: many interleaved transactions on the same few rollup rows
    settings = load_settings(
        {},
        database_url=endpoints.database_url,
        redis_url=endpoints.redis_url,
        batch_max_entries=250,
    )
    drains = [_own_drain(settings, f"metrics-test-{i}") for i in range(3)]
    r = random.Random(3)
    points = [
        _point(
            r.choice(["a", "b"]),
            r.randint(-1000, 100_000) / 4,
            {"model": r.choice(["m1", "m2"])},
            T0 + timedelta(seconds=r.uniform(0, 2 * BUCKET_S)),
        )
        for _ in range(20_000)
    ]
    _xadd(rdb, drains[0].stream.key, points)
    try:
        reports: list[DrainReport] = _in_threads(*(lambda d=d: d.run(60) for d in drains))
        # each drain stops once its last batch was partial: finish whatever is left
        while drains[0].run(60).entries:
            pass
    finally:
        for d in drains:
            d.db.close()
            d.stream.conn.close()
    assert all(rep.batches for rep in reports)  # every drain took part
    _assert_exact(pg, points)


def test_the_same_batch_processed_by_two_drains_at_once_counts_once(
    settings: Settings, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    # what a reclaim racing a slow (not dead) consumer does: both store the same entries
    first, second = _own_drain(settings, "slow"), _own_drain(settings, "reclaimer")
    points = _mixed(random.Random(4), 2000)
    _xadd(rdb, first.stream.key, points)
    entries = first.stream.read(5000)
    try:
        a, b = _in_threads(lambda: first.process(entries), lambda: second.process(entries))
    finally:
        for d in (first, second):
            d.db.close()
            d.stream.conn.close()
    assert a.inserted + b.inserted == 2000
    _assert_exact(pg, points)


def test_bad_points_are_dead_lettered_with_their_codes(
    runtime: Runtime, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    good = [_point("ok", float(i), {"k": "v"}) for i in range(40)]
    bad = {
        "nan": (_point("m", math.nan), "not_finite"),
        "inf": (_point("m", math.inf), "not_finite"),
        "-inf": (_point("m", -math.inf), "not_finite"),
        "bool": (_point("m", True), "wrong_type"),
        "no value": ({"id": uuid7_str(), "created_at": T0, "name": "m"}, "missing_field"),
        "tags list": ({**_point("m", 1.0), "tags": ["a", "b"]}, "bad_tags"),
        "nested tag": (_point("m", 1.0, {"a": {"b": "c"}}), "bad_tags"),  # type: ignore[dict-item]
        "int tag": (_point("m", 1.0, {"a": 1}), "bad_tags"),  # type: ignore[dict-item]
        "tag key": (_point("m", 1.0, {"bad key!": "x"}), "bad_tags"),
        "many tags": (_point("m", 1.0, {f"t{i}": "x" for i in range(33)}), "bad_tags"),
        "long tag": (_point("m", 1.0, {"t": "x" * 201}), "bad_tags"),
        "tag bytes": (_point("m", 1.0, {f"t{i}": "é" * 100 for i in range(6)}), "bad_tags"),
        "name": (_point("bad name", 1.0), "bad_name"),
        "name start": (_point("9lives", 1.0), "bad_name"),
        "long name": (_point("n" * 201, 1.0), "too_long"),
        "nan tag value": ({**_point("m", 1.0), "tags": {"a": math.nan}}, "not_finite"),
    }
    drain = runtime.drain("metric")
    _xadd(rdb, drain.stream.key, [*good[:20], *(p for p, _ in bad.values()), *good[20:]])
    report = drain.run(budget_s=5)
    assert (report.inserted, report.dead_lettered) == (40, len(bad))
    codes = dict(pg.execute("SELECT event_id, error_code FROM dead_letters").fetchall())
    assert {what: codes[p["id"]] for what, (p, _) in bad.items()} == {
        what: code for what, (_, code) in bad.items()
    }
    _assert_exact(pg, good)


def test_a_database_rejection_is_bisected_and_the_rollups_stay_exact(
    runtime: Runtime, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    # a rule only PostgreSQL knows: the culprit's savepoint rolls back its rollup too
    pg.execute("ALTER TABLE metric_points ADD CONSTRAINT test_small CHECK (value < 1e9)")
    try:
        good = _mixed(random.Random(5), 300)
        good = [p for p in good if p["value"] < 1e9]
        culprit = _point("llm.tokens", 1e12, {"model": "gpt-4o"})
        drain = runtime.drain("metric")
        _xadd(rdb, drain.stream.key, [*good[:150], culprit, *good[150:]])
        report = drain.run(budget_s=10)
    finally:
        pg.execute("ALTER TABLE metric_points DROP CONSTRAINT test_small")
    assert (report.inserted, report.dead_lettered) == (len(good), 1)
    _assert_exact(pg, good)


def test_sql_merge_equals_python_merge(pg: psycopg.Connection[Any]) -> None:
    r = random.Random(6)
    a = Sketch().extend(r.choice([0.0, r.gauss(0, 100)]) for _ in range(5000))
    b = Sketch().extend(r.lognormvariate(3, 2) for _ in range(5000))
    row = pg.execute(
        "SELECT afterwrite_sketch_merge(%s, %s), afterwrite_sketch_merge(NULL, %s)",
        (Jsonb(a.to_json()), Jsonb(b.to_json()), Jsonb(b.to_json())),
    ).fetchone()
    assert row is not None
    assert Sketch.from_json(row[0]) == Sketch().merge(a).merge(b)
    assert Sketch.from_json(row[1]) == b


def test_summary_reads_any_window_back_within_the_bound(
    runtime: Runtime, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    r = random.Random(7)
    points = [
        _point(
            "llm.latency_ms",
            r.lognormvariate(math.log(300 if model == "slow" else 80), 0.9),
            {"model": model, "region": r.choice(["eu", "us"])},
            T0 + timedelta(seconds=r.uniform(0, 10 * BUCKET_S)),
        )
        for model in ("fast", "slow")
        for _ in range(10_000)
    ]
    points.append(_point("other", 1.0, {"model": "fast"}))
    drain = runtime.drain("metric")
    _xadd(rdb, drain.stream.key, points)
    drain.run(budget_s=30)

    since, until = T0 + timedelta(minutes=2), T0 + timedelta(minutes=7)
    results = summary(pg, "llm.latency_ms", since=since, until=until, group_by=["model"])
    assert [res["tags"] for res in results] == [{"model": "fast"}, {"model": "slow"}]
    for res in results:
        exact = sorted(
            v
            for (v,) in pg.execute(
                "SELECT value FROM metric_points WHERE name = 'llm.latency_ms' "
                "AND tags @> %s AND created_at >= %s AND created_at < %s",
                (Jsonb(res["tags"]), since, until),
            )
        )
        assert res["count"] == len(exact)
        assert res["sum"] == pytest.approx(sum(exact), rel=1e-12)
        assert res["avg"] == pytest.approx(sum(exact) / len(exact), rel=1e-12)
        assert (res["min"], res["max"]) == (exact[0], exact[-1])
        for label, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            truth = exact[math.floor(q * (len(exact) - 1))]
            assert abs(res[label] - truth) <= ALPHA * truth + 1e-9, (label, res[label], truth)

    # a tag filter, and everything in one group
    (eu_fast,) = summary(
        pg, "llm.latency_ms", since=T0, until=until, tags={"model": "fast", "region": "eu"}
    )
    assert eu_fast["tags"] == {}
    assert eu_fast["count"] == sum(
        1
        for p in points
        if p["tags"] == {"model": "fast", "region": "eu"}
        and p["name"] == "llm.latency_ms"
        and p["created_at"] < until
    )
    assert summary(pg, "llm.latency_ms", since=until + timedelta(hours=1), until=until) == []
