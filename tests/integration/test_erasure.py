"""Erasing a user everywhere: real Redis, PostgreSQL, drains, spill journal and indexes.

The user is put in every store first (stored rows, metric points, pending stream entries, a
spilled entry, a dead letter, the current index, an older version and the delta), each found
there before the erasure, so that the test would fail if the erasure missed one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from click.testing import CliRunner

from afterwrite.cli.main import main as cli
from afterwrite.core import erasure, wire
from afterwrite.core.settings import Settings, load_settings
from afterwrite.demo.services import Endpoints
from afterwrite.producer import Client, Outcome
from afterwrite.producer.client import redis_options
from afterwrite.readers.index_reader import IndexReader
from afterwrite.spill.erase import erase_entries
from afterwrite.vectorindex import files
from afterwrite.worker.index import jobs
from afterwrite.worker.ingest.streams import Stream
from afterwrite.worker.operations.erasure import erase_user
from afterwrite.worker.runtime import Runtime
from tests.index_helpers import add, random_unit

U = "alice@example.org"
V = "bob"
DIM = 16


def _settings(endpoints: Endpoints, tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(
        {},
        database_url=endpoints.database_url,
        redis_url=endpoints.redis_url,
        data_dir=tmp_path / "data",
        batch_timeout_s=1,
        reclaim_idle_s=2,
        **overrides,
    )


def _client(settings: Settings) -> Client:
    conn = redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings))
    return Client(conn, settings)


def _count(pg: psycopg.Connection[Any], sql: str, *args: Any) -> int:
    row = pg.execute(sql, args).fetchone()
    assert row is not None
    return int(row[0])


def _embed(pg: psycopg.Connection[Any], settings: Settings) -> tuple[Any, str]:
    """40 documents, d…0-4 naming U in their metadata, with cache entries; v1 and v2 built;
    then one more of U's documents only in v2's freshness delta."""
    model = settings.collection_model("docs")
    x = random_unit(41, DIM, seed=3)
    add(pg, "docs", x[:40], model=model)
    pg.execute(
        "UPDATE embeddings SET content_hash = sha256(doc_id::bytea),"
        " metadata = jsonb_build_object('user_id', CASE WHEN doc_id < 'd000000005'"
        " THEN %s ELSE %s END)",
        (U, V),
    )
    pg.execute(
        "INSERT INTO embedding_cache (model, content_hash, dim, vector)"
        " SELECT model, content_hash, dim, vector FROM embeddings"
    )
    assert jobs.rebuild(settings, "docs", force=True)["status"] == "published"
    assert jobs.rebuild(settings, "docs", force=True)["status"] == "published"
    late = x[40]
    pg.execute(
        "INSERT INTO embeddings (collection, doc_id, job_id, model, dim, vector, metadata,"
        " enqueued_at, committed_at) VALUES ('docs', 'late', gen_random_uuid(), %s, %s, %s,"
        " jsonb_build_object('user', %s::text), now(), now())",
        (model, DIM, late.astype("<f4").tobytes(), U),
    )
    jobs.refresh_deltas(settings)
    return x, model


def _user_docs(reader: IndexReader, x: Any) -> set[str]:
    found: set[str] = set()
    for i in (0, 1, 2, 3, 4, 40):
        found |= {doc for doc, _ in reader.search(x[i], k=3)}
    return found & {"d000000000", "d000000001", "d000000002", "d000000003", "d000000004", "late"}


def test_an_erasure_finds_the_user_in_every_store_and_nothing_brings_it_back(
    endpoints: Endpoints, tmp_path: Path, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    settings = _settings(endpoints, tmp_path)
    client = _client(settings)
    rt = Runtime(settings)
    try:
        # stored rows, metric points, a dead letter
        for i in range(3):
            client.record_query(f"question {i} from Alice", user_id=U)
        kept = client.record_query("question from Bob", user_id=V)
        client.record_query("bad one", user_id=U, prompt_tokens=-1)
        client.record_metric("llm.latency_ms", 12.0, tags={"user_id": U, "model": "m"})
        client.record_metric("llm.latency_ms", 13.0, tags={"user_id": V, "model": "m"})
        rt.drain("query").run(budget_s=5)
        rt.drain("metric").run(budget_s=5)
        assert _count(pg, "SELECT count(*) FROM query_history WHERE user_id = %s", U) == 3
        assert _count(pg, "SELECT count(*) FROM dead_letters WHERE payload->>'user_id' = %s", U)

        # pending entries: read by a consumer that dies before committing
        pending = [client.record_query(f"pending {i}", user_id=U) for i in range(2)]
        stream = Stream(rdb, wire.stream_key("afterwrite", "query"), "afterwrite", "dead:1:1")
        assert len(stream.read(10)) == 2

        # a spilled entry of each user (the stream is over its cap)
        capped = _settings(endpoints, tmp_path, stream_max_entries=1)
        spiller = _client(capped)
        assert spiller.record_query("spilled from Alice", user_id=U).outcome is Outcome.SPILLED
        assert spiller.record_query("spilled from Bob", user_id=V).outcome is Outcome.SPILLED
        spiller.close()
        spill_root = settings.spill_path

        def alice(_kind: str, entry: bytes) -> bool:
            return U in erasure.users_named(wire.decode(entry))

        assert erase_entries(spill_root, alice, dry_run=True).removed == 1

        # the current index, an older version and the delta
        x, _model = _embed(pg, settings)
        index_dir = settings.index_path
        directory = index_dir / "docs"
        assert files.versions_on_disk(directory) == [1, 2]
        reader = IndexReader("docs", index_dir, check_interval_s=0)
        assert _user_docs(reader, x) == {f"d00000000{i}" for i in range(5)} | {"late"}

        # a dry run counts and changes nothing
        runner = CliRunner()
        env = {
            "AFTERWRITE_DATABASE_URL": settings.require_database_url(),
            "AFTERWRITE_REDIS_URL": settings.require_redis_url(),
            "AFTERWRITE_DATA_DIR": str(tmp_path / "data"),
        }
        result = runner.invoke(cli, ["erase", "--user-id", U, "--dry-run", "--json"], env=env)
        assert result.exit_code == 0, result.output
        assert '"query_history": 3' in result.output
        assert _count(pg, "SELECT count(*) FROM query_history WHERE user_id = %s", U) == 3
        assert _count(pg, "SELECT count(*) FROM erasure_log") == 0

        report = erase_user(U, settings=settings)
        counts = report.counts
        assert counts["query_history"] == 3
        assert counts["metric_points"] == 1
        assert counts["metric_rollups"] == 1
        assert counts["dead_letters"] == 1
        assert counts["stream_entries"] == 2
        assert counts["embeddings"] == 6
        assert counts["embedding_cache"] == 5  # "late" had no cache entry
        assert counts["spill_entries"] == 1
        assert counts["index_versions_pruned"] == 2
        assert report.collections == ["docs"]

        # SQL: nothing of Alice; Bob untouched
        for sql in (
            "SELECT count(*) FROM query_history WHERE user_id = %s",
            "SELECT count(*) FROM metric_points WHERE tags->>'user_id' = %s",
            "SELECT count(*) FROM metric_rollups WHERE tags->>'user_id' = %s",
            "SELECT count(*) FROM embeddings WHERE metadata::text LIKE '%%' || %s || '%%'",
            "SELECT count(*) FROM dead_letters"
            " WHERE position(convert_to(%s, 'UTF8') IN payload_raw) > 0",
        ):
            assert _count(pg, sql, U) == 0, sql
        assert _count(pg, "SELECT count(*) FROM query_history WHERE id = %s", kept) == 1
        assert _count(pg, "SELECT count(*) FROM embeddings WHERE deleted AND vector IS NULL") == 6
        assert _count(pg, "SELECT count(*) FROM embedding_cache") == 35

        # IndexReader.search, and index rollback
        assert files.versions_on_disk(directory) == [3]
        reader.reload()
        assert reader.version == 3
        assert _user_docs(reader, x) == set()
        assert _user_docs(IndexReader("docs", index_dir), x) == set()
        with pytest.raises(ValueError, match="no version older"):
            jobs.rollback(settings, "docs")

        # the spill journal kept Bob's entry only
        assert erase_entries(spill_root, alice, dry_run=True).removed == 0

        # a worker restart: the dead consumer's pending entries are reclaimed, not stored
        time.sleep(settings.reclaim_idle_s + 0.2)
        restarted = Runtime(settings)
        try:
            restarted.drain("query").reclaim()
            assert not rdb.xpending(stream.key, "afterwrite")["pending"]
            # the spilled entries come back through a producer's replay
            replayer = _client(settings)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                restarted.drain("query").run(budget_s=2)
                bob = "SELECT count(*) FROM query_history WHERE query = 'spilled from Bob'"
                if _count(pg, bob):
                    break
                time.sleep(0.2)
            replayer.close()
            assert _count(pg, bob) == 1
            ids = {str(r[0]) for r in pg.execute("SELECT id FROM query_history")}
            assert ids.isdisjoint(pending)
            assert _count(pg, "SELECT count(*) FROM query_history WHERE user_id = %s", U) == 0

            # a record of Alice after the erasure is stored normally
            after = client.record_query("back again", user_id=U)
            restarted.drain("query").run(budget_s=5)
            assert _count(pg, "SELECT count(*) FROM query_history WHERE id = %s", after) == 1
        finally:
            restarted.close()

        # the log: counts and the hash, never the id; a re-run is idempotent
        row = pg.execute("SELECT user_hash, counts::text FROM erasure_log").fetchall()
        assert len(row) == 1
        assert row[0][0] == erasure.user_hash(U)
        assert U not in row[0][1]
        pg.execute("DELETE FROM query_history WHERE id = %s", (after,))
        again = erase_user(U, settings=settings)
        assert not any(again.counts[k] for k in ("query_history", "dead_letters", "embeddings"))
        assert _count(pg, "SELECT count(*) FROM erasure_log") == 2
    finally:
        client.close()
        rt.close()
