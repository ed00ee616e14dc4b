"""``afterwrite bench``: hot-path latency, drain throughput on two row shapes, worker memory, idle
cost, and a Celery baseline.

Everything is measured in one run, on this machine, against real services, and printed as one
table of figures with their reference and ratio; :func:`run_bench` returns the same figures as a
JSON-serialisable dict.

What is measured, and how
-------------------------
1. **Hot path.** ``Client.record_query(**kwargs)`` with realistic kwargs
   (:func:`afterwrite.demo.traffic.queries`) against a raw redis-py ``XADD`` of the same encoded
   payload to the same stream, over a connection with the same options
   (:func:`afterwrite.producer.client.redis_options`). Each call is timed with ``perf_counter_ns``
   after a warm-up; the two are interleaved in blocks of
   :data:`~benchmarks.hotpath.HOT_BLOCK` calls so that both see the same machine conditions. The
   same for :class:`producer.AsyncClient` against an asyncio raw ``XADD``. Target: record_query p99
   ≤ 1.5 × raw XADD p99.
2. **Drain rate.** The stream is preloaded (pipelined ``XADD``) with ``entries`` realistic query
   records; only then a real Celery worker (``--concurrency 2``) and beat are started. The stream
   length is polled every :data:`~benchmarks.drain.POLL_S`: the drain deletes entries (XACK +
   XDEL) right after their batch commits, so ``entries - XLEN`` is the number of committed rows, and
   the rate is taken from the first to the last observed commit, excluding worker start-up. It is
   compared with the **idempotent COPY ceiling**, measured in the same run on the same rows and
   table (with its indexes): one Python process writing prebuilt rows (decoded and validated by
   :class:`afterwrite.worker.ingest.rows.RowCodec` beforehand, so the ceiling excludes validation)
   through
   :func:`afterwrite.worker.ingest.batch_writer.write_batch` (COPY → staging → INSERT … ON CONFLICT
   → COMMIT, the ``afterwrite.worker.ingest.sql.kind_sql`` statements) in ``batch_max_entries``-row
   batches, also timed from first to last commit. Target ≥ 60 % of the ceiling, aim 80 %. To say
   where the time goes, CPU seconds per row are reported for the worker tree, its PostgreSQL
   backends (when their processes are visible in ``/proc``) and Redis (``INFO cpu``), and for the
   ceiling's own process and backend, plus how many CPUs the whole machine was busy on while
   draining (other load on the machine lowers every rate).
3. **Baseline.** The same records through one Celery message per event (``apply_async`` of a JSON
   task) consumed by a ``celery_batches.Batches`` task (flush_every 2,000, flush_interval 1 s) that
   writes with the same code (:mod:`benchmarks.celery_baseline`). Enqueueing happens before its
   worker starts; its per-call latency and total time are reported, and its rate is timed from first
   to last commit (a Redis counter the task bumps after each commit). It may run on fewer records
   than the drain (``baseline_entries``); rates are compared. Target: afterwrite ≥ 20 × the
   baseline.
4. **Worker memory.** The resident set (``VmRSS`` from ``/proc``) of the worker's main process plus
   all its descendants, every :data:`~benchmarks.procfs.RSS_EVERY_S` while draining: start (idle,
   just before the first commit), peak and end. With a large backlog a smaller drain
   (``compare_entries``, by default a quarter) runs too, to show the peak does not grow with the
   backlog.
5. **Row shapes.** Phase 2 runs twice, ceiling and drain each time: on the realistic rows
   above (~1.7 KB, where PostgreSQL's index work dominates) and on lean rows
   (:func:`benchmarks.drain.lean`: short query and answer, one model id, small metadata,
   ~0.3 KB), where the worker's own CPU per row decides how close it keeps to the database.
   Target: worker ≤ 20 µs of CPU per row on both.
6. **Idle cost** (:mod:`benchmarks.idle`). A worker and beat on empty streams, after
   :data:`~benchmarks.idle.SETTLE_S` of start-up, measured over ``idle_s`` (60 s): their process
   trees' CPU from ``/proc``, Redis's CPU and commands per second, the worker's PostgreSQL
   backends. Target: worker + beat ≤ 2 % of one core.

Isolation: a dedicated database (:data:`~benchmarks.context.BENCH_DATABASE`, dropped and
re-created and migrated each run) on the configured (or local, or private) PostgreSQL server, a
dedicated stream prefix (:data:`~benchmarks.context.BENCH_STREAM_PREFIX`) on the configured Redis,
and a dedicated Redis database (``broker_db``) as the bench processes' Celery broker, so that beat's
kicks never reach, and are never taken by, a real deployment's workers. Every process started here
is stopped in ``finally``.

Where each part lives: :mod:`benchmarks.context` (the state every phase shares, isolation),
:mod:`benchmarks.hotpath` (1), :mod:`benchmarks.drain` (2, 4, 5), :mod:`benchmarks.idle` (6),
:mod:`benchmarks.procfs` (RSS and CPU from ``/proc``), :mod:`benchmarks.celery_phase` (3, run
against :mod:`benchmarks.celery_baseline`), :mod:`benchmarks.report` (ratios, the table). This
module only orders the phases and assembles their figures.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console

from afterwrite.core.settings import Settings
from benchmarks.celery_phase import measure_baseline
from benchmarks.context import (
    BENCH_BROKER_DB,
    BENCH_DATABASE,
    CONCURRENCY,
    Bench,
    open_bench,
)
from benchmarks.drain import Backlog, make_backlog, measure_ceiling, measure_drain
from benchmarks.hotpath import measure_hot_path
from benchmarks.idle import measure_idle
from benchmarks.producer import measure_producer
from benchmarks.producer import print_table as print_producer_table
from benchmarks.report import (
    AIM_DRAIN_RATIO,
    TARGET_DRAIN_RATIO,
    TARGET_SPEEDUP,
    print_table,
    ratio_of,
)

# --- the run --------------------------------------------------------------------------------


def _drain_vs_ceiling(b: Bench, backlog: Backlog, entries: int, label: str) -> dict[str, Any]:
    """The COPY ceiling and the drain on the same rows, and their ratio."""
    ceiling = measure_ceiling(b, backlog)
    drain = measure_drain(b, backlog, entries, label)
    drain["ceiling"] = ceiling
    ratio = ratio_of(drain["rows_per_s"], ceiling["rows_per_s"])
    drain["ratio_to_ceiling"] = ratio
    drain["target_ratio"] = TARGET_DRAIN_RATIO
    drain["aim_ratio"] = AIM_DRAIN_RATIO
    drain["ok"] = ratio is not None and ratio >= TARGET_DRAIN_RATIO
    return drain


def _load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _machine(b: Bench) -> dict[str, Any]:
    with psycopg.connect(b.db_url, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    info: Any = b.admin_redis.info("server")
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgres": row[0] if row else None,
        "redis": str(info.get("redis_version")),
    }


def run_bench(
    settings: Settings,
    *,
    entries: int,
    calls: int,
    baseline: bool,
    console: Console,
    baseline_entries: int | None = None,
    compare_entries: int | None = None,
    data_dir: Path | None = None,
    database: str = BENCH_DATABASE,
    broker_db: int = BENCH_BROKER_DB,
    concurrency: int = CONCURRENCY,
    idle_s: float = 60.0,
) -> dict[str, Any]:
    """Run every measurement (module doc), print the table, return the figures.

    ``baseline_entries``: events for the celery-batches baseline (default ``min(entries,
    20_000)``). ``compare_entries``: backlog of a second, smaller drain for the memory
    comparison (default ``entries // 4`` when ``entries`` ≥ 100,000, else none; 0 skips it).
    ``database`` / ``broker_db``: where the bench keeps its rows and its Celery messages.
    ``idle_s``: how long to measure an idle worker and beat (0 skips it).
    """
    if entries <= 0 or calls <= 0:
        raise ValueError("entries and calls must be positive")
    if baseline_entries is None:
        baseline_entries = min(entries, 20_000)
    baseline_entries = min(baseline_entries, entries)
    if compare_entries is None:
        compare_entries = entries // 4 if entries >= 100_000 else 0
    run_started = time.perf_counter()
    result: dict[str, Any] = {}
    with open_bench(
        settings,
        console,
        data_dir=data_dir,
        database=database,
        broker_db=broker_db,
        concurrency=concurrency,
    ) as b:
        result["machine"] = _machine(b)
        result["machine"]["load_avg_at_start"] = _load_avg()
        result["config"] = {
            "entries": entries,
            "calls": calls,
            "baseline_entries": baseline_entries if baseline else 0,
            "compare_entries": compare_entries,
            "batch_max_entries": b.settings.batch_max_entries,
            "worker_concurrency": concurrency,
            "database": database,
            "stream_prefix": b.settings.stream_prefix,
            "broker_db": broker_db,
            "idle_s": idle_s,
            "logs": str(b.log_dir),
        }
        # The hot path first, while this process is small: later phases hold the backlog in
        # memory, and full collections over it would show up as hot-path latency.
        result["hot_path"] = measure_hot_path(b, calls)
        b.reset_redis()
        # Background mode, spill cost and replay rate (benchmarks.producer), same calls.
        result["producer"] = measure_producer(b.settings, calls)
        b.reset_redis()
        backlog = make_backlog(b, entries)
        result["drain"] = _drain_vs_ceiling(b, backlog, entries, "backlog")
        lean = make_backlog(b, entries, "lean")
        result["drain_lean"] = _drain_vs_ceiling(b, lean, entries, "lean backlog")
        del lean
        drain = result["drain"]
        if compare_entries > 0:
            small = measure_drain(b, backlog, compare_entries, "small backlog")
            result["drain_small"] = small
            big_peak = drain["worker_rss"].get("peak_mb")
            small_peak = small["worker_rss"].get("peak_mb")
            result["rss_bounded"] = {
                "small_entries": compare_entries,
                "small_peak_mb": small_peak,
                "entries": entries,
                "peak_mb": big_peak,
                "peak_growth": ratio_of(big_peak, small_peak),
                "backlog_growth": round(entries / compare_entries, 2),
            }
        if baseline:
            base = measure_baseline(b, backlog, baseline_entries)
            speedup = ratio_of(drain["rows_per_s"], base["rows_per_s"])
            base["afterwrite_speedup"] = speedup
            base["target_speedup"] = TARGET_SPEEDUP
            base["ok"] = speedup is not None and speedup >= TARGET_SPEEDUP
            base["apply_async_p99_vs_record_query"] = ratio_of(
                base["apply_async"].get("p99_us"), result["hot_path"]["record_query"]["p99_us"]
            )
            result["baseline"] = base
        del backlog
        if idle_s > 0:
            result["idle"] = measure_idle(b, idle_s)
        # Rows are not kept between runs (the database is re-created anyway): free the disk.
        b.reset_tables()
    result["machine"]["load_avg_at_end"] = _load_avg()
    result["total_s"] = round(time.perf_counter() - run_started, 1)
    print_table(result, console)
    print_producer_table(result["producer"], console)
    return result
