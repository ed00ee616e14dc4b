"""``afterwrite bench``, phase 3: the celery-batches baseline.

The same records through one Celery message per event (``apply_async`` of a JSON task, each
call timed), then consumed by the :mod:`benchmarks.celery_baseline` worker, timed from first to last
commit through the Redis counter its task bumps after each commit.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from afterwrite.core import wire
from afterwrite.demo import processes
from afterwrite.demo.run import progress_bar
from benchmarks import celery_baseline as bench_baseline
from benchmarks.context import Bench, worker_env
from benchmarks.drain import Backlog, wait_committed
from benchmarks.report import latency_summary


def measure_baseline(b: Bench, backlog: Backlog, count: int) -> dict[str, Any]:
    # The record as the application would pass it to a task: a dict (datetimes included,
    # kombu's JSON encodes them); RowCodec accepts what comes out.
    records = [wire.decode(p) for p in backlog.payloads[:count]]
    b.reset_tables()
    b.reset_redis()
    app = bench_baseline.make_app(b.settings.celery_broker_url)
    task = app.tasks[bench_baseline.TASK]
    warm = min(100, count // 10)
    latencies: list[int] = []
    clock = time.perf_counter_ns
    started = time.perf_counter()
    with progress_bar(b.console) as progress:
        bar = progress.add_task("enqueue apply_async", total=count, info="")
        for i, record in enumerate(records):
            t0 = clock()
            task.apply_async(args=(record,))
            if i >= warm:
                latencies.append(clock() - t0)
            if i % 1000 == 999:
                progress.advance(bar, 1000)
    enqueue_s = time.perf_counter() - started
    del records
    app.close()  # the producer's broker connections; this app is done

    env = worker_env(b.settings)
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "benchmarks.celery_baseline",
        "worker",
        "--concurrency",
        str(b.concurrency),
        "--loglevel",
        "WARNING",
        "-Q",
        bench_baseline.QUEUE,
        "--hostname",
        "bench-baseline@%h",
        "--without-mingle",
        "--without-gossip",
    ]
    key = bench_baseline.committed_key(b.settings.stream_prefix)
    worker: processes.Process | None = None
    try:
        worker = processes.Process("bench-baseline", argv, env, b.log_dir / "bench-baseline.log")

        def committed() -> int:
            return int(b.admin_redis.get(key) or 0)

        timeline = wait_committed(b, "draining baseline", count, committed, [worker], None)
    finally:
        if worker is not None:
            worker.stop()
    verified = b.verify(backlog.ids[:count])
    rejected = int(b.admin_redis.get(bench_baseline.rejected_key(b.settings.stream_prefix)) or 0)
    figures = timeline.figures()
    b.console.print(
        f"celery-batches baseline, {count:,} events: {figures['rows_per_s'] or 0:,} rows/s "
        f"(enqueue {enqueue_s:.1f} s)"
    )
    return {
        "entries": count,
        "flush_every": bench_baseline.FLUSH_EVERY,
        "flush_interval_s": bench_baseline.FLUSH_INTERVAL_S,
        "enqueue_s": round(enqueue_s, 3),
        "enqueue_per_s": round(count / enqueue_s) if enqueue_s > 0 else None,
        "apply_async": latency_summary(latencies),
        **figures,
        **verified,
        "rejected": rejected,
    }
