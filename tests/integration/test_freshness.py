"""End-to-end freshness against real PostgreSQL: enqueue → committed → embedded → searchable."""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from rich.console import Console

from afterwrite.cli.main import main
from afterwrite.cli.observe import status_tables
from afterwrite.core.settings import Settings, load_settings
from afterwrite.models.registry import kinds
from afterwrite.producer import Client
from afterwrite.worker.operations.freshness import (
    STAGES,
    Distribution,
    collect_freshness,
    commit_lag,
)
from afterwrite.worker.operations.status import collect
from afterwrite.worker.runtime import Runtime

COLLECTION = "fresh_docs"

# The index engineer's migration creates index_builds; until it lands, the tests create a table
# with the columns freshness reads (and drop it again), so the measurement is still exercised.
INDEX_BUILDS_SQL = """
CREATE TABLE index_builds (
    id bigserial PRIMARY KEY, collection varchar(64) NOT NULL, version integer NOT NULL,
    kind varchar(8) NOT NULL, status varchar(16) NOT NULL, max_seq bigint NOT NULL,
    vector_count bigint NOT NULL DEFAULT 0, started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
)"""


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings)
    yield rt
    rt.close()


@pytest.fixture
def embeddings_world(pg: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """Empty embeddings rows and index builds of COLLECTION; an index_builds table exists."""
    created = pg.execute("SELECT to_regclass('index_builds') IS NULL").fetchone() == (True,)
    if created:
        pg.execute(INDEX_BUILDS_SQL)
    pg.execute("DELETE FROM embeddings WHERE collection = %s", (COLLECTION,))
    pg.execute("DELETE FROM index_builds WHERE collection = %s", (COLLECTION,))
    yield pg
    pg.execute("DELETE FROM embeddings WHERE collection = %s", (COLLECTION,))
    if created:
        pg.execute("DROP TABLE index_builds")
    else:
        pg.execute("DELETE FROM index_builds WHERE collection = %s", (COLLECTION,))


def _ordered(d: Distribution) -> None:
    assert d.samples > 0
    assert d.p50_s is not None
    assert d.p90_s is not None
    assert d.p99_s is not None
    assert d.max_s is not None
    assert 0 <= d.p50_s <= d.p90_s <= d.p99_s <= d.max_s


def test_enqueue_to_committed_follows_a_known_wait(
    settings: Settings, runtime: Runtime, pg: psycopg.Connection[Any]
) -> None:
    with Client.from_env(settings) as client:
        for i in range(40):
            client.record_query(f"q{i}")
    time.sleep(1.0)  # every entry waits at least this long before its batch commits
    assert runtime.drain("query").run(budget_s=5).inserted == 40
    d = commit_lag(pg, kinds.get("query"))
    assert d is not None
    assert (d.stage, d.scope, d.samples) == ("enqueue_to_committed", "query", 40)
    _ordered(d)
    assert d.p50_s is not None
    assert d.max_s is not None
    assert d.p50_s >= 1.0
    assert d.max_s < 30

    # a row committed outside the window is not counted
    time.sleep(0.05)
    outside = commit_lag(pg, kinds.get("query"), window_s=0.01)
    assert outside == Distribution("enqueue_to_committed", "query", 0, None, None, None, None)


def test_a_caller_supplied_created_at_does_not_distort_it(
    settings: Settings, runtime: Runtime, pg: psycopg.Connection[Any]
) -> None:
    from datetime import timedelta

    with Client.from_env(settings) as client:
        client.record_query("backfilled", created_at=datetime.now(UTC) - timedelta(days=3))
    runtime.drain("query").run(budget_s=5)
    d = commit_lag(pg, kinds.get("query"))
    assert d is not None
    assert d.max_s is not None
    assert d.samples == 1
    assert d.max_s < 30


def _insert_embedding(
    pg: psycopg.Connection[Any],
    ref: datetime,
    doc: str,
    enq_ago_s: float,
    commit_s: float,
    embed_s: float,
) -> int:
    """A row enqueued ``enq_ago_s`` ago, committed ``commit_s`` later, embedded ``embed_s``
    after that; returns its seq."""
    row = pg.execute(
        "INSERT INTO embeddings (collection, doc_id, job_id, enqueued_at, committed_at,"
        " embedded_at) VALUES (%(c)s, %(d)s, %(j)s,"
        " %(ref)s - make_interval(secs => %(a)s),"
        " %(ref)s - make_interval(secs => %(a)s) + make_interval(secs => %(cs)s),"
        " %(ref)s - make_interval(secs => %(a)s) + make_interval(secs => %(cs)s + %(es)s))"
        " RETURNING seq",
        {
            "c": COLLECTION,
            "d": doc,
            "j": uuid.uuid4(),
            "a": enq_ago_s,
            "cs": commit_s,
            "es": embed_s,
            "ref": ref,
        },
    ).fetchone()
    assert row is not None
    return int(row[0])


def _publish(
    pg: psycopg.Connection[Any], ref: datetime, version: int, max_seq: int, ago_s: float
) -> None:
    pg.execute(
        "INSERT INTO index_builds (collection, version, kind, status, max_seq, vector_count,"
        " started_at, finished_at) VALUES (%s, %s, 'delta', 'published', %s, 1,"
        " %s - make_interval(secs => %s), %s - make_interval(secs => %s))",
        (COLLECTION, version, max_seq, ref, ago_s + 0.1, ref, ago_s),
    )


def test_embedding_stages_from_embeddings_and_index_builds(
    embeddings_world: psycopg.Connection[Any],
) -> None:
    pg = embeddings_world
    ref = datetime.now(UTC)  # one reference time for every row: exact intervals
    # enqueued 100 s ago, committed after 1 s, embedded after 2 s (at -97 s)
    seqs = [_insert_embedding(pg, ref, f"d{i}", 100, 1.0, 2.0) for i in range(6)]
    late = _insert_embedding(pg, ref, "late", 50, 3.0, 4.0)  # embedded at -43 s, not yet covered
    _publish(pg, ref, 1, seqs[2], ago_s=95)  # covers d0..d2: searchable 2 s after embedding
    _publish(pg, ref, 2, seqs[-1], ago_s=90)  # covers d3..d5: 7 s after embedding
    _publish(pg, ref, 3, seqs[-1], ago_s=80)  # later publishes do not count for them
    _publish(pg, ref, 4, late + 100, ago_s=1)
    pg.execute("UPDATE index_builds SET status = 'failed' WHERE version = 4")

    figures = {(d.stage, d.scope): d for d in collect_freshness(pg, list(kinds))}
    embed_commit = figures[("enqueue_to_committed", "embed")]
    assert embed_commit.samples == 7
    _ordered(embed_commit)
    assert embed_commit.p50_s == pytest.approx(1.0, abs=0.01)
    assert embed_commit.max_s == pytest.approx(3.0, abs=0.01)

    embedded = figures[("committed_to_embedded", COLLECTION)]
    assert embedded.samples == 7
    _ordered(embedded)
    assert embedded.p50_s == pytest.approx(2.0, abs=0.01)
    assert embedded.max_s == pytest.approx(4.0, abs=0.01)

    searchable = figures[("embedded_to_searchable", COLLECTION)]
    assert searchable.samples == 6
    _ordered(searchable)
    assert searchable.p50_s == pytest.approx(4.5, abs=0.01)  # between 2 s and 7 s
    assert searchable.max_s == pytest.approx(7.0, abs=0.01)
    # the late row: no published build covers it (version 4 failed)
    assert searchable.waiting == 1
    assert searchable.oldest_waiting_s is not None
    assert 42 <= searchable.oldest_waiting_s < 60

    # stage order per row: enqueue ≤ commit ≤ embedded ≤ searchable
    assert tuple(d.stage for d in (embed_commit, embedded, searchable)) == STAGES


@pytest.fixture
def env(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key in [k for k in os.environ if k.startswith("AFTERWRITE_")]:
        monkeypatch.delenv(key)
    for key, value in base_env.items():
        if key.startswith("AFTERWRITE_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("AFTERWRITE_INDEX_DIR", str(tmp_path))
    return tmp_path


def test_status_shows_freshness_embeddings_and_indexes(
    env: Path,
    settings: Settings,
    runtime: Runtime,
    embeddings_world: psycopg.Connection[Any],
    rdb: Any,
) -> None:
    with Client.from_env(settings) as client:
        for i in range(5):
            client.record_query(f"q{i}")
    runtime.drain("query").run(budget_s=5)
    ref = datetime.now(UTC)
    seq = _insert_embedding(embeddings_world, ref, "d", 30, 0.5, 1.5)
    _publish(embeddings_world, ref, 7, seq, ago_s=20)
    rdb.hset(
        f"{settings.stream_prefix}:embed:stats",
        mapping={"requests": 3, "cache_hits": 2, "unchanged": 1, "embedded": 3},
    )
    (env / COLLECTION).mkdir()
    (env / COLLECTION / "manifest.json").write_text(
        json.dumps(
            {
                "collection": COLLECTION,
                "version": 7,
                "vector_count": 1,
                "model": "m",
                "dim": 4,
                "index_type": "Flat",
                "built_at": time.time() - 20,
                "max_seq": seq,
            }
        )
    )

    result = CliRunner().invoke(main, ["status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert {"streams", "tables", "dead_letters"} <= set(report)  # the original keys stay
    fresh = {(f["stage"], f["scope"]): f for f in report["freshness"]}
    query = fresh[("enqueue_to_committed", "query")]
    assert query["samples"] == 5
    assert 0 <= query["p50_s"] <= query["p90_s"] <= query["p99_s"] <= query["max_s"] < 30
    assert fresh[("committed_to_embedded", COLLECTION)]["p50_s"] == pytest.approx(1.5, abs=0.01)
    assert fresh[("embedded_to_searchable", COLLECTION)]["p50_s"] == pytest.approx(8, abs=0.01)
    emb = report["embeddings"]
    assert emb["counters"]["requests"] == 3
    assert emb["cache_hit_rate"] == pytest.approx(2 / 5)  # cache hits / (hits + embedded)
    assert emb["backlog"] == 0
    (index,) = report["indexes"]
    assert (index["collection"], index["version"], index["vector_count"]) == (COLLECTION, 7, 1)
    assert 19 <= index["age_s"] < 60
    assert 19 <= index["last_publish_age_s"] < 60

    # what `afterwrite status` prints after its original tables
    status = collect(load_settings())
    out = io.StringIO()
    Console(file=out, width=200).print(*status_tables(status))
    text = out.getvalue()
    assert "freshness" in text
    assert "enqueue_to_committed" in text
    assert COLLECTION in text
    assert "50%" in text
