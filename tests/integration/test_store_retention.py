"""Retention of the embedding cache and of index versions, against real PostgreSQL and
real index builds."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from afterwrite.core import erasure
from afterwrite.demo.services import Endpoints
from afterwrite.vectorindex import files
from afterwrite.worker.index import jobs
from afterwrite.worker.operations.store_retention import (
    prune_old_index_versions,
    run_store_retention,
)
from tests.index_helpers import add, index_settings, random_unit, upsert

DIM = 16


def _cache(pg: psycopg.Connection[Any], model: str, key: bytes, age_days: int) -> None:
    pg.execute(
        "INSERT INTO embedding_cache (model, content_hash, dim, vector, created_at)"
        " VALUES (%s, %s, 1, '\\x00000000', now() - make_interval(days => %s))",
        (model, key, age_days),
    )


def test_old_cache_entries_no_live_document_uses_are_deleted(
    endpoints: Endpoints, tmp_path: Path, pg: psycopg.Connection[Any]
) -> None:
    settings = index_settings(endpoints, tmp_path, embedding_cache_retention_days=90)
    model = "m"
    used, unused, recent, tombstoned = (bytes([i]) * 32 for i in range(1, 5))
    for key, age in ((used, 200), (unused, 200), (recent, 10), (tombstoned, 200)):
        _cache(pg, model, key, age)
    add(pg, "docs", random_unit(2, DIM), model=model)
    pg.execute(
        "UPDATE embeddings SET content_hash = CASE doc_id WHEN 'd000000000' THEN %s ELSE %s END,"
        " deleted = (doc_id <> 'd000000000')",
        (used, tombstoned),
    )
    reports = run_store_retention(pg, settings)
    left = {bytes(r[0]) for r in pg.execute("SELECT content_hash FROM embedding_cache")}
    assert left == {used, recent}
    assert reports[0].as_dict()["deleted"] == 2
    run_store_retention(pg, settings)  # idempotent
    assert {bytes(r[0]) for r in pg.execute("SELECT content_hash FROM embedding_cache")} == left


def test_index_versions_older_than_their_retention_are_pruned_never_the_published_one(
    endpoints: Endpoints, tmp_path: Path, pg: psycopg.Connection[Any]
) -> None:
    settings = index_settings(endpoints, tmp_path / "idx", index_keep_versions=10)
    model = settings.collection_model("docs")
    x = random_unit(50, DIM)
    add(pg, "docs", x, model=model)
    for i in range(3):
        upsert(pg, "docs", f"extra{i}", x[i], model=model)
        assert jobs.rebuild(settings, "docs")["status"] == "published"
    directory = settings.index_path / "docs"
    assert files.versions_on_disk(directory) == [1, 2, 3]

    # ten days from now: v1 and v2 are past a 5-day retention; v3 is published and stays
    later = time.time() + 10 * 86_400
    report = prune_old_index_versions(settings, 5, now_s=later)
    assert report.deleted == 2
    assert files.versions_on_disk(directory) == [3]
    assert (directory / files.MANIFEST).exists()
    with pytest.raises(ValueError, match="no version older"):  # nothing left to roll back to
        jobs.rollback(settings, "docs")


def test_old_erasure_log_rows_and_tombstones_expire(
    endpoints: Endpoints, tmp_path: Path, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    settings = index_settings(
        endpoints, tmp_path, erasure_log_retention_days=10, erasure_tombstone_days=5
    )
    for age in (20, 1):
        pg.execute(
            "INSERT INTO erasure_log (erased_at, user_hash, counts, collections, host, duration_s)"
            " VALUES (now() - make_interval(days => %s), %s, '{}', '[]', 'h', 0)",
            (age, f"{age:064d}"),
        )
    now_ms = int(time.time() * 1000)
    key = erasure.tombstone_key(settings.stream_prefix)
    rdb.hset(key, mapping={"old": now_ms - 6 * 86_400_000, "new": now_ms - 86_400_000})
    run_store_retention(pg, settings, rdb)
    assert [r[0] for r in pg.execute("SELECT user_hash FROM erasure_log")] == [f"{1:064d}"]
    assert set(rdb.hkeys(key)) == {b"new"}
