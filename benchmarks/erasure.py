"""How long erasing one user takes: 10,000 of their rows among 1,000,000.

``python -m benchmarks.erasure [--rows N] [--user-rows M]`` (under the bench lock). Loads
``query_history`` with COPY (N rows, M of them the user's, the rest spread over 10,000 other
users), plus 100,000 metric points and 1,000 dead letters, then times ``erase_user`` (a dry
run, the erasure, and a re-run that finds nothing). Needs PostgreSQL and Redis as
``benchmarks.privacy`` does (database ``AFTERWRITE_TEST_REDIS_DB``, default 14, is flushed).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import redis

from afterwrite import migrations
from afterwrite.core.settings import load_settings
from afterwrite.demo.services import ensure_database, local_endpoints
from afterwrite.worker.operations.erasure import erase_user

DATABASE = "afterwrite_bench_erasure"
USER = "user-target@example.org"


def load(db_url: str, rows: int, user_rows: int) -> float:
    started = time.perf_counter()
    now = datetime.now(UTC)
    every = max(1, rows // user_rows)
    with psycopg.connect(db_url) as conn:
        with conn.cursor().copy(
            "COPY query_history (id, created_at, user_id, session_id, query, response, mode)"
            " FROM STDIN"
        ) as copy:
            for i in range(rows):
                user = USER if i % every == 0 and i // every < user_rows else f"user-{i % 10_000}"
                copy.write_row(
                    (
                        uuid.uuid4(),
                        now - timedelta(seconds=i),
                        user,
                        f"s-{i % 50_000}",
                        f"question number {i} about retrieval and ranking",
                        "an answer of a few words " * 8,
                        "chat",
                    )
                )
        with conn.cursor().copy(
            "COPY metric_points (id, created_at, name, tags, value) FROM STDIN"
        ) as copy:
            for i in range(100_000):
                user = USER if i % 100 == 0 else f"user-{i % 10_000}"
                copy.write_row(
                    (uuid.uuid4(), now, "llm.latency_ms", json.dumps({"user_id": user}), 1.0)
                )
        with conn.cursor().copy(
            "COPY dead_letters (kind, payload_raw, payload_sha256, payload, reason, detail)"
            " FROM STDIN"
        ) as copy:
            for i in range(1_000):
                user = USER if i % 10 == 0 else f"user-{i}"
                body = json.dumps({"user_id": user, "query": "x"})
                copy.write_row(
                    ("query", body.encode(), uuid.uuid4().bytes * 2, body, "invalid", "bench")
                )
        conn.execute("ANALYZE")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--user-rows", type=int, default=10_000)
    args = parser.parse_args(argv)
    admin = os.environ.get("AFTERWRITE_TEST_DATABASE_URL") or local_endpoints()[0]
    if admin is None:
        raise SystemExit("no PostgreSQL: set AFTERWRITE_TEST_DATABASE_URL")
    redis_base = os.environ.get("AFTERWRITE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
    redis_url = f"{redis_base.rstrip('/')}/{os.environ.get('AFTERWRITE_TEST_REDIS_DB', '14')}"
    db_url = ensure_database(admin, DATABASE, recreate=True)
    migrations.upgrade("postgresql+psycopg://" + db_url.split("://", 1)[1])
    redis.Redis.from_url(redis_url).flushdb()
    load_s = load(db_url, args.rows, args.user_rows)
    settings = load_settings(
        {},
        database_url=db_url,
        redis_url=redis_url,
        data_dir=Path(tempfile.mkdtemp(prefix="afterwrite-bench-erasure-")),
    )
    timings = {}
    for label, dry in (("dry_run", True), ("erase", False), ("re_run", False)):
        t0 = time.perf_counter()
        report = erase_user(USER, settings=settings, dry_run=dry)
        timings[label] = {"s": round(time.perf_counter() - t0, 3), "counts": report.counts}
    redis.Redis.from_url(redis_url).flushdb()
    print(
        json.dumps(
            {"rows": args.rows, "user_rows": args.user_rows, "load_s": round(load_s, 1), **timings},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
