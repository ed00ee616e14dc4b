"""``afterwrite bench``, phases 2 and 4: the backlog, the COPY ceiling, the drain and its memory.

The backlog is built once (:func:`make_backlog`); :func:`measure_ceiling` writes it through
:func:`afterwrite.worker.ingest.batch_writer.write_batch` from one process; :func:`measure_drain`
preloads it into the stream, starts a real worker and beat, and polls the stream length every
:data:`POLL_S` (:func:`wait_committed`, which the baseline uses too) while sampling the worker's
memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import redis

from afterwrite.core import wire
from afterwrite.demo import processes, traffic
from afterwrite.demo.run import progress_bar
from afterwrite.models.registry import kinds
from afterwrite.worker.ingest.batch_writer import write_batch
from afterwrite.worker.ingest.database import Database
from afterwrite.worker.ingest.rows import RowCodec
from afterwrite.worker.ingest.sql import derived_columns, kind_sql
from benchmarks import celery_baseline as bench_baseline
from benchmarks.context import (
    KIND,
    Bench,
    BenchError,
    worker_env,
)
from benchmarks.procfs import RssSampler, process_cpu_s, system_cpu

POLL_S = 0.05
STALL_TIMEOUT_S = 120.0
"""A phase fails when no row is committed for this long (worker stuck or misconfigured)."""
PRELOAD_CHUNK = 1000


# --- backlog records ------------------------------------------------------------------------


@dataclass
class Backlog:
    payloads: list[bytes]
    """Encoded stream payloads, exactly as a client would XADD them."""
    ids: list[str]


SHAPES = ("realistic", "lean")
"""Row shapes the drain is measured on: the demo's traffic (long answers, retrieval chunks,
~1.7 KB), and lean rows (short query and answer, one model, small metadata, ~0.3 KB) where
PostgreSQL costs less per row and the worker's own CPU shows."""


def lean(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A lean version of one realistic ``record_query`` call."""
    return {
        "query": kwargs["query"][:48],
        "response": kwargs["response"][:96],
        "user_id": kwargs["user_id"],
        "session_id": kwargs["session_id"],
        "mode": kwargs["mode"],
        "model_ids": kwargs["model_ids"][:1],
        "response_time_ms": kwargs["response_time_ms"],
        "prompt_tokens": kwargs["prompt_tokens"],
        "completion_tokens": kwargs["completion_tokens"],
        "metadata": {"app": "demo"},
    }


def make_backlog(b: Bench, count: int, shape: str = "realistic") -> Backlog:
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, not {shape!r}")
    payloads: list[bytes] = []
    ids: list[str] = []
    started = time.perf_counter()
    with progress_bar(b.console) as progress:
        task = progress.add_task("generating records", total=count, info="")
        for i, kw in enumerate(traffic.queries(count, seed=7)):
            record = traffic.as_record(lean(kw) if shape == "lean" else kw)
            ids.append(record.id)
            payloads.append(wire.encode(record))
            if i % 5000 == 4999:
                progress.advance(task, 5000)
    b.console.print(
        f"generated {count:,} {shape} query records "
        f"(mean {sum(map(len, payloads)) / max(count, 1):,.0f} B) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return Backlog(payloads, ids)


def _us_per_row(cpu_s: float | None, rows: int) -> float | None:
    """CPU microseconds per row, to 0.1 µs; None when the CPU time is unknown."""
    return None if cpu_s is None else round(cpu_s / rows * 1e6, 1)


# --- 2a. the idempotent COPY ceiling ---------------------------------------------------------


def measure_ceiling(b: Bench, backlog: Backlog) -> dict[str, Any]:
    kind = kinds.get(KIND)
    codec = RowCodec(kind.table)
    # as the drain under the bench's settings (AFTERWRITE_SEARCH_RESPONSES included)
    q = kind_sql(kind.table, codec.columns, derived=derived_columns(kind.table, b.settings))
    n = b.settings.batch_max_entries
    count = len(backlog.payloads)
    with progress_bar(b.console) as progress:
        task = progress.add_task("building rows     ", total=count, info="")
        built = time.perf_counter()
        rows = []
        for i, payload in enumerate(backlog.payloads):
            rows.append(codec.row(wire.decode(payload)))
            if i % 5000 == 4999:
                progress.advance(task, 5000)
        build_s = time.perf_counter() - built

        b.reset_tables()
        db = Database(
            b.db_url,
            statement_timeout_s=b.settings.batch_timeout_s,
            application_name="afterwrite-bench-ceiling",
        )
        task = progress.add_task("COPY ceiling      ", total=count, info="")
        commits: list[tuple[float, int]] = []
        inserted = 0
        try:
            conn = db.connection(q)
            backend = process_cpu_s(conn.info.backend_pid)
            own_cpu = time.process_time()
            started = time.perf_counter()
            for lo in range(0, count, n):
                result = write_batch(conn, q, rows[lo : lo + n], [], bench_baseline.no_dead_letters)
                inserted += result.inserted
                commits.append((time.perf_counter(), inserted))
                progress.advance(task, min(n, count - lo))
            own_cpu = time.process_time() - own_cpu
            backend_after = process_cpu_s(conn.info.backend_pid)
            backend_cpu = (
                None if backend is None or backend_after is None else backend_after - backend
            )
        finally:
            db.close()
    del rows
    if inserted != count:
        raise BenchError(f"ceiling inserted {inserted:,} of {count:,} rows")
    total_s = commits[-1][0] - started
    # First to last commit, as the drain is timed.
    (t_first, c_first), (t_last, c_last) = commits[0], commits[-1]
    window_s = t_last - t_first
    rate = (c_last - c_first) / window_s if window_s > 0 else count / total_s
    b.reset_tables()
    b.console.print(f"idempotent COPY ceiling: {rate:,.0f} rows/s")
    mean_bytes = sum(map(len, backlog.payloads)) / max(count, 1)
    return {
        "rows": count,
        "payload_bytes_mean": round(mean_bytes),
        "batch_rows": n,
        "seconds": round(total_s, 3),
        "rows_per_s": round(rate),
        "rows_per_s_incl_first_batch": round(count / total_s),
        "decode_validate_us_per_row": round(build_s / max(count, 1) * 1e6, 2),
        "cpu": {
            "python_us_per_row": _us_per_row(own_cpu, count),
            "postgres_us_per_row": _us_per_row(backend_cpu, count),
        },
    }


# --- 2b / 4. the drain, with worker memory ---------------------------------------------------


@dataclass
class Timeline:
    """Committed-row observations of one phase, from polling."""

    started: float
    first: tuple[float, int] | None = None
    last: tuple[float, int] | None = None
    machine_first: tuple[float, float] | None = None
    machine_last: tuple[float, float] | None = None
    """Machine-wide (busy, total) CPU seconds at the first and the last observed commit."""

    def observe(self, now: float, committed: int) -> None:
        if committed > 0 and self.first is None:
            self.first = (now, committed)
            self.machine_first = system_cpu()
        if self.last is None or committed != self.last[1]:
            self.last = (now, committed)
            if committed > 0:
                self.machine_last = system_cpu()

    def machine_busy_cores(self) -> float | None:
        """Average busy CPUs of the whole machine (every process) between first and last commit:
        how much else ran, and how close the phase came to using both cores."""
        if self.machine_first is None or self.machine_last is None:
            return None
        busy = self.machine_last[0] - self.machine_first[0]
        total = self.machine_last[1] - self.machine_first[1]
        cpus = os.cpu_count() or 1
        return round(busy / total * cpus, 2) if total > 0 else None

    def figures(self) -> dict[str, Any]:
        if self.first is None or self.last is None:
            return {"rows_per_s": None}
        (t1, c1), (t2, c2) = self.first, self.last
        window_s = t2 - t1
        return {
            "startup_s": round(t1 - self.started, 3),
            "measured_rows": c2 - c1,
            "measured_s": round(window_s, 3),
            "rows_per_s": round((c2 - c1) / window_s) if window_s > 0 and c2 > c1 else None,
            "total_s": round(t2 - self.started, 3),
            "machine_busy_cpus": self.machine_busy_cores(),
        }


def _backend_cpu_s(db_url: str, application_prefix: str) -> float | None:
    """CPU seconds used so far by the PostgreSQL backends serving ``application_prefix``*
    connections; None when their processes are not visible here (a remote server)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        pids = [
            int(r[0])
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s",
                (application_prefix + "%",),
            )
        ]
    used = [process_cpu_s(pid) for pid in pids]
    if not used or any(u is None for u in used):
        return None
    return sum(u for u in used if u is not None)


def _redis_cpu_s(conn: redis.Redis) -> float:
    info: Any = conn.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _preload(b: Bench, payloads: Sequence[bytes]) -> float:
    started = time.perf_counter()
    pipe = b.admin_redis.pipeline(transaction=False)
    with progress_bar(b.console) as progress:
        task = progress.add_task("preloading stream ", total=len(payloads), info="")
        for lo in range(0, len(payloads), PRELOAD_CHUNK):
            for payload in payloads[lo : lo + PRELOAD_CHUNK]:
                pipe.xadd(b.stream, {wire.PAYLOAD_FIELD: payload})
            pipe.execute()
            progress.advance(task, min(PRELOAD_CHUNK, len(payloads) - lo))
    length = int(b.admin_redis.xlen(b.stream))
    if length != len(payloads):
        raise BenchError(f"stream holds {length:,} entries after preloading {len(payloads):,}")
    return time.perf_counter() - started


def wait_committed(
    b: Bench,
    label: str,
    total: int,
    committed: Callable[[], int],
    watched: Sequence[processes.Process],
    rss: RssSampler | None,
) -> Timeline:
    """Poll ``committed()`` every POLL_S until it reaches ``total``; sample RSS on the way."""
    timeline = Timeline(started=time.perf_counter())
    if rss is not None:
        rss.started = timeline.started
    last_change = timeline.started
    with progress_bar(b.console) as progress:
        task = progress.add_task(f"{label:<18}", total=total, info="")
        while True:
            now = time.perf_counter()
            done = committed()
            previous = timeline.last
            timeline.observe(now, done)
            if previous is None or done != previous[1]:
                last_change = now
            mb = rss.maybe_sample(now, committed=done) if rss is not None else None
            info = ""
            if timeline.first is not None and now > timeline.first[0]:
                rate = (done - timeline.first[1]) / (now - timeline.first[0])
                info = f"{rate:,.0f} rows/s"
            if mb is not None:
                info += f"  worker RSS {mb:,.0f} MiB"
            progress.update(task, completed=done, info=info)
            if done >= total:
                break
            for p in watched:
                if not p.alive():
                    raise BenchError(f"{p.name} exited ({p.proc.returncode}):\n{p.tail()}")
            if now - last_change > STALL_TIMEOUT_S:
                logs = "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in watched)
                raise BenchError(
                    f"{label}: no row committed for {STALL_TIMEOUT_S:.0f} s "
                    f"({done:,}/{total:,})\n{logs}"
                )
            time.sleep(POLL_S)
    if rss is not None:
        rss.maybe_sample(time.perf_counter(), force=True, committed=committed())
    return timeline


def measure_drain(b: Bench, backlog: Backlog, count: int, label: str) -> dict[str, Any]:
    payloads = backlog.payloads[:count]
    b.reset_tables()
    b.reset_redis()
    preload_s = _preload(b, payloads)
    env = worker_env(b.settings)
    started: list[processes.Process] = []
    try:
        worker = processes.start_worker(
            env, b.log_dir, concurrency=b.concurrency, name=f"bench-{label}"
        )
        started.append(worker)
        started.append(processes.start_beat(env, b.log_dir))
        rss = RssSampler(root=worker.pid, started=time.perf_counter())

        def committed() -> int:
            return count - int(b.admin_redis.xlen(b.stream))

        redis_cpu_before = _redis_cpu_s(b.admin_redis)
        timeline = wait_committed(b, f"draining {label}", count, committed, started, rss)
        # Before the worker stops: its PostgreSQL backends exist only while it runs.
        postgres_cpu = _backend_cpu_s(b.db_url, "afterwrite-worker:")
        redis_cpu = _redis_cpu_s(b.admin_redis) - redis_cpu_before
    finally:
        for p in started:
            p.stop()
    verified = b.verify(backlog.ids[:count])
    figures = timeline.figures()
    worker_rss = rss.report(timeline.first[0] if timeline.first else None)
    worker_cpu = worker_rss.get("drain_cpu_s")
    cpu = {
        "worker_s": worker_cpu,
        "postgres_s": None if postgres_cpu is None else round(postgres_cpu, 2),
        "redis_s": round(redis_cpu, 2),
        "worker_us_per_row": _us_per_row(worker_cpu, count),
        "worker_steady_us_per_row": worker_rss.get("steady_cpu_us_per_row"),
        "postgres_us_per_row": _us_per_row(postgres_cpu, count),
        "redis_us_per_row": _us_per_row(redis_cpu, count),
    }
    b.console.print(
        f"drained {count:,} entries: {figures['rows_per_s'] or 0:,} rows/s "
        f"(worker start-up {figures.get('startup_s', 0):.1f} s)"
    )
    return {
        "entries": count,
        "preload_s": round(preload_s, 3),
        "preload_rows_per_s": round(count / preload_s) if preload_s > 0 else None,
        **figures,
        **verified,
        "cpu": cpu,
        "worker_rss": worker_rss,
    }
