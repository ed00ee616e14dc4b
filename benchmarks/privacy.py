"""What redaction costs: worker CPU per row with it off and on, and per producer call.

``python -m benchmarks.privacy [--rows N] [--rounds R]`` (run it under the bench lock). Needs a
PostgreSQL server (``AFTERWRITE_TEST_DATABASE_URL`` or the local one) and Redis
(``AFTERWRITE_TEST_REDIS_URL``, database ``AFTERWRITE_TEST_REDIS_DB``, default 14, flushed).

Worker: the same backlog of realistic query records (one in four carrying an e-mail address,
a card number, a phone number and an IP address in its query and response) is preloaded into
the stream and drained by a real :class:`~afterwrite.worker.ingest.drain.KindDrain` in this
process, into a real database, with redaction off and with ``query.*=all`` (every built-in on
query, response, retrieval and metadata). Figures are this process's CPU time (``/proc``
user + system) per row: steadier than wall time on a busy machine, though it rises with the
other load too (~2x on two busy cores), so compare rounds of one run. PostgreSQL's own CPU is
the same in both runs (the rows are as long) and is not counted.

Producer: the CPU one ``record_query`` call costs with ``AFTERWRITE_PRODUCER_REDACT`` off and
on (background mode, so the call does no network I/O; the flusher thread's CPU is included).

Raw text in Redis (``--lifetime-s S``): a real worker and beat (default settings) drain paced
traffic (200 records/s) for S seconds; an entry's raw text lives in Redis from its XADD (the
time in its entry id) until the XDEL that follows its batch's commit. Reported: the
distribution of ``ingested_at`` (the commit) minus the entry id's time, which that bounds to
within the acknowledgement's round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from afterwrite import migrations
from afterwrite.core import wire
from afterwrite.core.settings import Settings, load_settings
from afterwrite.demo import traffic
from afterwrite.demo.services import ensure_database, local_endpoints
from afterwrite.producer import Client
from afterwrite.producer.client import redis_options
from afterwrite.worker.runtime import Runtime
from benchmarks.procfs import process_cpu_s

DATABASE = "afterwrite_bench_privacy"
PII = (
    " Reach me at ann.lee@example.org or +1 (555) 123-4567;"
    " card 4111 1111 1111 1111; ip 203.0.113.9."
)
RULES = {"query.*": "all"}


def _records(count: int) -> list[dict[str, Any]]:
    out = []
    for i, kw in enumerate(traffic.queries(count, seed=11)):
        if i % 4 == 0:
            kw["query"] += PII
            kw["response"] += PII
        out.append(kw)
    return out


def _cpu_s() -> float:
    used = process_cpu_s(os.getpid())
    return used if used is not None else time.process_time()


def _settings(db_url: str, redis_url: str, data_dir: Path, **overrides: Any) -> Settings:
    return load_settings(
        {}, database_url=db_url, redis_url=redis_url, data_dir=data_dir, **overrides
    )


def drain_cpu_us_per_row(settings: Settings, payloads: list[bytes]) -> float:
    """Preload ``payloads``, drain them all in this process; this process's CPU µs per row."""
    r = redis.Redis.from_url(settings.require_redis_url())
    r.flushdb()
    key = wire.stream_key(settings.stream_prefix, "query")
    pipe = r.pipeline(transaction=False)
    for p in payloads:
        pipe.xadd(key, {wire.PAYLOAD_FIELD: p})
    pipe.execute()
    rt = Runtime(settings)
    try:
        with rt.db.connection(rt.drain("query").sql) as conn:
            conn.execute("TRUNCATE query_history, dead_letters")
            conn.commit()
        drain = rt.drain("query")
        before = _cpu_s()
        stored = 0
        while stored < len(payloads):
            report = drain.run(budget_s=60)
            stored += report.inserted + report.dead_lettered
            if report.entries == 0:
                raise RuntimeError(f"stream ran dry at {stored} of {len(payloads)} rows")
        used = _cpu_s() - before
    finally:
        rt.close()
        r.close()
    return used / len(payloads) * 1e6


def producer_cpu_us_per_call(settings: Settings, records: list[dict[str, Any]]) -> float:
    client = Client(
        redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings)), settings
    )
    try:
        before = _cpu_s()
        for kw in records:
            client.record_query(**kw)
        client.flush(30)
        used = _cpu_s() - before
    finally:
        client.close()
    return used / len(records) * 1e6


def raw_lifetime_s(db_url: str, redis_url: str, data_dir: Path, seconds: float) -> dict[str, Any]:
    from afterwrite.demo import processes

    env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERWRITE_")}
    env |= {
        "AFTERWRITE_DATABASE_URL": db_url,
        "AFTERWRITE_REDIS_URL": redis_url,
        "AFTERWRITE_DATA_DIR": str(data_dir),
    }
    redis.Redis.from_url(redis_url).flushdb()
    settings = _settings(db_url, redis_url, data_dir)
    client = Client(
        redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings)), settings
    )
    worker = processes.start_worker(env, data_dir)
    beat = processes.start_beat(env, data_dir)
    try:
        time.sleep(5)  # let the worker start
        started = time.monotonic()
        for sent, kw in enumerate(traffic.queries(int(seconds * 200), seed=5), 1):
            client.record_query(**{**kw, "metadata": {"bench": "lifetime"}})
            time.sleep(max(0.0, started + sent / 200 - time.monotonic()))
        r = redis.Redis.from_url(redis_url)
        key = wire.stream_key(settings.stream_prefix, "query")
        deadline = time.monotonic() + 60
        while r.xlen(key) and time.monotonic() < deadline:
            time.sleep(0.1)
        import psycopg

        with psycopg.connect(db_url) as conn:
            rows = conn.execute(
                "SELECT extract(epoch FROM ingested_at - created_at) FROM query_history"
                " WHERE metadata->>'bench' = 'lifetime' ORDER BY 1"
            ).fetchall()
    finally:
        client.close()
        beat.stop()
        worker.stop()
    lags = [float(row[0]) for row in rows]
    if not lags:
        return {"rows": 0}
    return {
        "rows": len(lags),
        "p50_s": round(lags[len(lags) // 2], 3),
        "p99_s": round(lags[int(len(lags) * 0.99)], 3),
        "max_s": round(lags[-1], 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lifetime-s", type=float, default=0.0)
    args = parser.parse_args(argv)

    admin = os.environ.get("AFTERWRITE_TEST_DATABASE_URL") or local_endpoints()[0]
    redis_base = os.environ.get("AFTERWRITE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
    redis_url = f"{redis_base.rstrip('/')}/{os.environ.get('AFTERWRITE_TEST_REDIS_DB', '14')}"
    if admin is None:
        raise SystemExit("no PostgreSQL: set AFTERWRITE_TEST_DATABASE_URL")
    db_url = ensure_database(admin, DATABASE, recreate=True)
    migrations.upgrade("postgresql+psycopg://" + db_url.split("://", 1)[1])
    data_dir = Path(tempfile.mkdtemp(prefix="afterwrite-bench-privacy-"))

    records = _records(args.rows)
    payloads = [wire.encode(traffic.as_record(kw)) for kw in records]
    off = _settings(db_url, redis_url, data_dir)
    on = _settings(db_url, redis_url, data_dir, redact=RULES)
    worker: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.rounds):  # alternate, so load changes hit both alike
        worker["off"].append(drain_cpu_us_per_row(off, payloads))
        worker["on"].append(drain_cpu_us_per_row(on, payloads))

    calls = records[: min(len(records), 20_000)]
    bg = {"producer_mode": "background", "producer_buffer_max_entries": 100_000}
    producer: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        redis.Redis.from_url(redis_url).flushdb()
        producer["off"].append(
            producer_cpu_us_per_call(_settings(db_url, redis_url, data_dir, **bg), calls)
        )
        redis.Redis.from_url(redis_url).flushdb()
        producer["on"].append(
            producer_cpu_us_per_call(
                _settings(db_url, redis_url, data_dir, redact=RULES, producer_redact=True, **bg),
                calls,
            )
        )
    redis.Redis.from_url(redis_url).flushdb()
    lifetime = (
        raw_lifetime_s(db_url, redis_url, data_dir, args.lifetime_s) if args.lifetime_s else None
    )
    result = {
        "rows": args.rows,
        "rounds": args.rounds,
        "rules": RULES,
        "worker_cpu_us_per_row": {k: round(statistics.median(v), 1) for k, v in worker.items()},
        "producer_cpu_us_per_call": {
            k: round(statistics.median(v), 2) for k, v in producer.items()
        },
        "raw_text_in_redis": lifetime,
        "all_rounds": {"worker": worker, "producer": producer},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
