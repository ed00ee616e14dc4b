"""Pure decisions of the drain path: batching, backoff, error classes, SQL shape."""

from __future__ import annotations

import random

import psycopg
import pytest
import redis

from afterwrite.core.backoff import compute_backoff_s
from afterwrite.models.registry import UnknownKindError, kinds
from afterwrite.worker.errors import Failure, classify
from afterwrite.worker.ingest.drain import keep_draining
from afterwrite.worker.ingest.rows import RowCodec
from afterwrite.worker.ingest.sql import kind_sql


@pytest.mark.parametrize(
    ("elapsed", "entries", "batch_s", "expected"),
    [
        (0.5, 5000, 0.1, True),  # full batch, time left: more backlog
        (0.5, 4999, 0.1, False),  # partial batch: caught up
        (9.95, 5000, 0.1, False),  # another batch would overrun the budget
        (9.9, 5000, 0.1, True),
        (0.0, 0, 0.0, False),
    ],
)
def test_keep_draining(elapsed: float, entries: int, batch_s: float, expected: bool) -> None:
    assert (
        keep_draining(
            elapsed_s=elapsed,
            budget_s=10.0,
            last_entries=entries,
            batch_max=5000,
            last_batch_s=batch_s,
        )
        is expected
    )


def test_backoff_grows_caps_and_jitters() -> None:
    plain = [compute_backoff_s(n, jitter=False) for n in range(1, 10)]
    assert plain[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(plain) == 30.0
    rng = random.Random(1)
    jittered = [compute_backoff_s(4, rand=rng) for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in jittered)
    assert len(set(jittered)) > 100


def _pg_error(sqlstate: str) -> psycopg.Error:
    cls = psycopg.errors.lookup(sqlstate)
    return cls("boom")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_pg_error("22P02"), Failure.POISON),  # invalid text representation
        (_pg_error("23514"), Failure.POISON),  # check violation
        (_pg_error("54000"), Failure.POISON),
        (_pg_error("42P01"), Failure.CONFIGURATION),  # undefined table: not migrated
        (_pg_error("42501"), Failure.CONFIGURATION),  # permission denied
        (_pg_error("57P01"), Failure.TRANSIENT),  # admin shutdown
        (_pg_error("40001"), Failure.TRANSIENT),  # serialization failure
        (psycopg.OperationalError("connection refused"), Failure.TRANSIENT),
        (redis.ConnectionError("down"), Failure.TRANSIENT),
        (redis.AuthenticationError("bad password"), Failure.CONFIGURATION),
        (UnknownKindError("nope"), Failure.CONFIGURATION),
    ],
)
def test_failures_are_classified(exc: BaseException, expected: Failure) -> None:
    assert classify(exc) is expected


def test_kind_sql_quotes_identifiers_and_is_idempotent() -> None:
    kind = kinds.get("query")
    q = kind_sql(kind.table, RowCodec(kind.table).columns)
    insert = q.insert.as_string(None)
    assert insert.startswith('INSERT INTO "query_history" ("id", "created_at"')
    assert insert.endswith('ON CONFLICT ("id") DO NOTHING')
    # server defaults apply to fields a record left out
    assert "COALESCE(\"model_ids\", '[]'::jsonb)" in insert
    assert 'COALESCE("ingested_at", now())' in insert
    assert q.copy.as_string(None).startswith('COPY "_afterwrite_stage_query_history" ("id"')
    assert "ON COMMIT DELETE ROWS" in q.create_staging.as_string(None)


def test_unknown_kind_names_are_refused() -> None:
    with pytest.raises(UnknownKindError, match="unknown record kind 'query; DROP TABLE x'"):
        kinds.get("query; DROP TABLE x")
