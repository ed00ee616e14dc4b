"""``afterwrite bench``: hot-path latency, drain throughput, worker memory, and a Celery baseline.

Everything is measured in one run, on this machine, against real services, and printed as one
table of figures with their reference and ratio; :func:`run_bench` returns the same figures as a
JSON-serialisable dict.

What is measured, and how
-------------------------
1. **Hot path.** ``Client.record_query(**kwargs)`` with realistic kwargs
   (:func:`worker.traffic.queries`) against a raw redis-py ``XADD`` of the same encoded payload
   to the same stream, over a connection with the same options
   (:func:`producer.client.redis_options`). Each call is timed with ``perf_counter_ns`` after a
   warm-up; the two are interleaved in blocks of :data:`HOT_BLOCK` calls so that both see the
   same machine conditions. The same for :class:`producer.AsyncClient` against an asyncio raw
   ``XADD``. Target: record_query p99 ≤ 1.5 × raw XADD p99.
2. **Drain rate.** The stream is preloaded (pipelined ``XADD``) with ``entries`` realistic query
   records; only then a real Celery worker (``--concurrency 2``) and beat are started. The
   stream length is polled every :data:`POLL_S`: the drain deletes entries (XACK + XDEL) right
   after their batch commits, so ``entries - XLEN`` is the number of committed rows, and the
   rate is taken from the first to the last observed commit, excluding worker start-up.
   It is compared with the **idempotent COPY ceiling**, measured in the same run on the same
   rows and table (with its indexes): one Python process writing prebuilt rows (decoded and
   validated by :class:`worker.rows.RowCodec` beforehand, so the ceiling excludes validation)
   through :func:`worker.batch_writer.write_batch` (COPY → staging → INSERT … ON CONFLICT →
   COMMIT, the ``worker.sql.kind_sql`` statements) in ``batch_max_entries``-row batches, also
   timed from first to last commit. Target ≥ 60 % of the ceiling, aim 80 %.
   To say where the time goes, CPU seconds per row are reported for the worker tree, its
   PostgreSQL backends (when their processes are visible in ``/proc``) and Redis (``INFO
   cpu``), and for the ceiling's own process and backend, plus how many CPUs the whole machine
   was busy on while draining (other load on the machine lowers every rate).
3. **Baseline.** The same records through one Celery message per event (``apply_async`` of a
   JSON task) consumed by a ``celery_batches.Batches`` task (flush_every 2,000, flush_interval
   1 s) that writes with the same code (:mod:`worker.bench_baseline`). Enqueueing happens before
   its worker starts; its per-call latency and total time are reported, and its rate is timed
   from first to last commit (a Redis counter the task bumps after each commit). It may run on
   fewer records than the drain (``baseline_entries``); rates are compared. Target: afterwrite
   ≥ 20 × the baseline.
4. **Worker memory.** The resident set (``VmRSS`` from ``/proc``) of the worker's main process
   plus all its descendants, every :data:`RSS_EVERY_S` while draining: start (idle, just before
   the first commit), peak and end. With a large backlog a smaller drain (``compare_entries``,
   by default a quarter) runs too, to show the peak does not grow with the backlog.

Isolation: a dedicated database (:data:`BENCH_DATABASE`, dropped and re-created and migrated each
run) on the configured (or local, or private) PostgreSQL server, a dedicated stream prefix
(:data:`BENCH_STREAM_PREFIX`) on the configured Redis, and a dedicated Redis database
(``broker_db``) as the bench processes' Celery broker, so that beat's kicks never reach, and are
never taken by, a real deployment's workers. Every process started here is stopped in
``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import redis
import redis.asyncio as aioredis
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import migrations
from afterwrite import wire
from afterwrite.services import ensure_database
from afterwrite.settings import ENV_PREFIX, Settings
from models.registry import kinds
from producer import AsyncClient, Client, Outcome
from producer.client import redis_options
from producer.records import query_record
from worker import bench_baseline, processes, traffic
from worker.batch_writer import Rejection, write_batch
from worker.database import Database
from worker.dead_letters import DeadEntry
from worker.demo import demo_endpoints
from worker.rows import RowCodec
from worker.sql import kind_sql

BENCH_DATABASE = "afterwrite_bench"
BENCH_STREAM_PREFIX = "afterwrite-bench"
BENCH_BROKER_DB = 14
"""Redis database (on the configured server) used as the Celery broker of the bench processes."""
KIND = "query"
CONCURRENCY = 2

HOT_BLOCK = 100
POLL_S = 0.05
RSS_EVERY_S = 0.5
STALL_TIMEOUT_S = 120.0
"""A phase fails when no row is committed for this long (worker stuck or misconfigured)."""
PRELOAD_CHUNK = 1000

TARGET_HOT_P99_RATIO = 1.5
TARGET_DRAIN_RATIO = 0.60
AIM_DRAIN_RATIO = 0.80
TARGET_SPEEDUP = 20.0

# Settings not handed to the bench worker: where things are is decided here, and secrets stay
# out of the child's environment.
_NOT_FORWARDED = frozenset(
    {"database_url", "redis_url", "broker_url", "stream_prefix", "flower_user", "flower_password"}
)
_QUERY_OPTIONAL = (
    "response",
    "user_id",
    "session_id",
    "mode",
    "model_ids",
    "response_time_ms",
    "prompt_tokens",
    "completion_tokens",
    "retrieval",
    "metadata",
)


class BenchError(RuntimeError):
    """A phase could not complete (a process died, no progress, rows missing)."""


# --- small helpers --------------------------------------------------------------------------


def latency_summary(samples_ns: Sequence[int]) -> dict[str, float]:
    """Nearest-rank percentiles of per-call latencies, in microseconds."""
    ordered = sorted(samples_ns)
    n = len(ordered)
    if n == 0:
        return {}

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1000

    return {
        "p50_us": round(rank(0.50), 1),
        "p90_us": round(rank(0.90), 1),
        "p99_us": round(rank(0.99), 1),
        "p999_us": round(rank(0.999), 1),
        "max_us": round(ordered[-1] / 1000, 1),
        "mean_us": round(sum(ordered) / n / 1000, 1),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def broker_url_for(redis_url: str, db: int) -> str:
    """``redis_url`` pointing at database ``db`` (path for redis://, ``?db=`` for unix://)."""
    parts = urlsplit(redis_url)
    if parts.scheme == "unix":
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "db"] + [("db", str(db))]
        return urlunsplit(parts._replace(query=urlencode(query)))
    return urlunsplit(parts._replace(path=f"/{db}"))


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment for bench processes: ours without ``AFTERWRITE_*``, plus the settings that
    were set explicitly (tunables included, so the worker batches exactly as the ceiling does)
    and the bench's endpoints and stream prefix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    values = settings.model_dump()
    for name in sorted(settings.model_fields_set - _NOT_FORWARDED):
        value = values[name]
        if value is not None:
            env[ENV_PREFIX + name.upper()] = _env_value(value)
    env[ENV_PREFIX + "DATABASE_URL"] = settings.require_database_url()
    env[ENV_PREFIX + "REDIS_URL"] = settings.require_redis_url()
    env[ENV_PREFIX + "BROKER_URL"] = settings.celery_broker_url
    env[ENV_PREFIX + "STREAM_PREFIX"] = settings.stream_prefix
    return env


def _env_value(value: Any) -> str:
    """A setting's value as its ``AFTERWRITE_*`` variable spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(str(v) for v in value)
    return str(value)


def _query_record(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The payload ``Client.record_query(**kwargs)`` would send (fresh id and time)."""
    args: dict[str, Any] = dict.fromkeys(_QUERY_OPTIONAL)
    args.update(kwargs)
    query = args.pop("query")
    return query_record(query, event_id=None, created_at=None, **args)


def _no_dead_letters(_rejections: Sequence[Rejection]) -> list[DeadEntry]:
    # The ceiling writes valid rows only; write_batch needs the callback all the same.
    return []


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


# --- process memory and CPU (Linux /proc; no psutil dependency) ----------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3… of /proc/<pid>/stat (state, ppid, …), or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    return stat.rsplit(")", 1)[1].split()


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` has used so far (fields 14 and 15 of its stat)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def system_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / _CLK_TCK, sum(ticks) / _CLK_TCK


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it, from the parent pids in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat_fields(int(name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class TreeSample:
    """One look at a process tree: resident MiB per pid, CPU seconds so far per pid."""

    rss_mb: dict[int, float]
    cpu_s: dict[int, float]

    @property
    def total_mb(self) -> float:
        return sum(self.rss_mb.values())


def sample_tree(root: int) -> TreeSample | None:
    """VmRSS and CPU time of ``root`` and its descendants; None without /proc.

    RSS is summed over the processes, so pages shared after fork count once per process:
    an upper bound of what the tree holds.
    """
    if not Path("/proc/self/status").exists():
        return None
    rss: dict[int, float] = {}
    cpu: dict[int, float] = {}
    for pid in _descendants(root):
        kb = _rss_kb(pid)
        used = process_cpu_s(pid)
        if kb is not None and used is not None:
            rss[pid] = kb / 1024
            cpu[pid] = used
    return TreeSample(rss, cpu)


@dataclass
class RssSampler:
    """Samples of one process tree, taken by the caller's polling loop every RSS_EVERY_S."""

    root: int
    started: float
    samples: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since ``started``, total MiB)"""
    peak_per_pid: dict[int, float] = field(default_factory=dict)
    cpu_s: dict[int, float] = field(default_factory=dict)
    """Latest CPU seconds per pid (a pid that exits keeps its last reading)."""
    cpu_at: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since ``started``, CPU seconds of the tree so far)"""
    next_at: float = 0.0

    def maybe_sample(self, now: float, *, force: bool = False) -> float | None:
        if not force and now < self.next_at:
            return None
        self.next_at = now + RSS_EVERY_S
        sample = sample_tree(self.root)
        if sample is None:
            return None
        t = round(now - self.started, 2)
        self.samples.append((t, round(sample.total_mb, 1)))
        for pid, mb in sample.rss_mb.items():
            self.peak_per_pid[pid] = max(self.peak_per_pid.get(pid, 0.0), mb)
        self.cpu_s.update(sample.cpu_s)
        self.cpu_at.append((t, sum(self.cpu_s.values())))
        return sample.total_mb

    def report(self, first_commit_at: float | None) -> dict[str, Any]:
        if not self.samples:
            return {"available": False}
        first_rel = None if first_commit_at is None else first_commit_at - self.started
        before = [mb for t, mb in self.samples if first_rel is not None and t <= first_rel]
        cpu_before = [c for t, c in self.cpu_at if first_rel is not None and t <= first_rel]
        return {
            "available": True,
            "start_mb": before[-1] if before else self.samples[0][1],
            "peak_mb": max(mb for _, mb in self.samples),
            "end_mb": self.samples[-1][1],
            "processes": len(self.peak_per_pid),
            "peak_per_process_mb": sorted(round(mb, 1) for mb in self.peak_per_pid.values()),
            "samples": [list(s) for s in self.samples],
            # CPU the worker tree used from its last idle sample to the end of the drain.
            "drain_cpu_s": round(self.cpu_at[-1][1] - (cpu_before[-1] if cpu_before else 0), 2),
        }


# --- the context every phase shares ----------------------------------------------------------


@dataclass
class _Bench:
    settings: Settings
    """Bench settings: bench database, configured Redis, bench broker db and stream prefix."""
    admin_redis: redis.Redis
    broker_redis: redis.Redis
    console: Console
    log_dir: Path
    concurrency: int

    @property
    def stream(self) -> str:
        return wire.stream_key(self.settings.stream_prefix, KIND)

    @property
    def db_url(self) -> str:
        return self.settings.require_database_url()

    def reset_redis(self) -> None:
        """Delete every key under the bench prefix and the bench broker's Celery queues."""
        keys = list(self.admin_redis.scan_iter(match=f"{self.settings.stream_prefix}:*"))
        if keys:
            self.admin_redis.delete(*keys)
        stale = [
            "celery",
            bench_baseline.QUEUE,
            "unacked",
            "unacked_index",
            "unacked_mutex",
        ]
        self.broker_redis.delete(*stale)

    def reset_tables(self) -> None:
        """Empty the bench tables and checkpoint, so every phase starts from the same state."""
        table = kinds.get(KIND).table.name
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute(f'TRUNCATE "{table}", dead_letters')
            # A checkpoint now rather than in the middle of the next measurement; it needs
            # superuser or pg_checkpoint, and the figures stay valid without it.
            with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
                conn.execute("CHECKPOINT")

    def verify(self, ids: Sequence[str]) -> dict[str, Any]:
        """Did every record arrive exactly once? Compares stored ids with the ids sent."""
        table = kinds.get(KIND).table.name
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            stored = {str(r[0]) for r in conn.execute(f'SELECT id FROM "{table}"')}
            row = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
            dead = int(row[0]) if row else 0
        expected = set(ids)
        missing = len(expected - stored)
        unexpected = len(stored - expected)
        return {
            "rows": len(stored),
            "missing": missing,
            "unexpected": unexpected,
            "dead_letters": dead,
            "exactly_once": missing == 0 and unexpected == 0 and dead == 0,
        }


# --- 1. hot path ----------------------------------------------------------------------------


def _hot_path(b: _Bench, calls: int) -> dict[str, Any]:
    warm = min(1000, max(100, calls // 10))
    kwargs = list(traffic.queries(warm + calls, seed=11))
    # The raw XADD sends the bytes record_query would have built for the same kwargs.
    payloads = [wire.encode(_query_record(kw)) for kw in kwargs]
    settings = _direct_producer(b.settings, b.log_dir.parent / "bench-spill")
    url = settings.require_redis_url()
    field_ = wire.PAYLOAD_FIELD
    stream = b.stream

    client = Client.from_env(settings)
    raw = redis.Redis.from_url(url, **redis_options(settings))
    sync_client: list[int] = []
    sync_raw: list[int] = []
    failed = 0
    with _progress(b.console) as progress:
        task = progress.add_task("hot path (sync) ", total=warm + calls, info="")
        try:
            for i in range(warm):
                client.record_query(**kwargs[i])
                raw.xadd(stream, {field_: payloads[i]})
            progress.advance(task, warm)
            gc.collect()
            clock = time.perf_counter_ns
            for start in range(warm, warm + calls, HOT_BLOCK):
                block = range(start, min(start + HOT_BLOCK, warm + calls))
                for i in block:
                    t0 = clock()
                    raw.xadd(stream, {field_: payloads[i]})
                    sync_raw.append(clock() - t0)
                for i in block:
                    t0 = clock()
                    receipt = client.record_query(**kwargs[i])
                    sync_client.append(clock() - t0)
                    failed += receipt.outcome is not Outcome.SENT
                progress.advance(task, len(block))
        finally:
            client.close()
            raw.close()
        task = progress.add_task("hot path (async)", total=warm + calls, info="")
        async_client, async_raw, async_failed = asyncio.run(
            _hot_path_async(settings, kwargs, payloads, warm, lambda n: progress.advance(task, n))
        )
    sync = latency_summary(sync_client)
    sync_base = latency_summary(sync_raw)
    aio = latency_summary(async_client)
    aio_base = latency_summary(async_raw)
    p99_ratio = _ratio(sync["p99_us"], sync_base["p99_us"])
    return {
        "calls": calls,
        "warmup_calls": warm,
        "payload_bytes_mean": round(sum(map(len, payloads)) / len(payloads)),
        "record_query": sync,
        "raw_xadd": sync_base,
        "p50_ratio": _ratio(sync["p50_us"], sync_base["p50_us"]),
        "p99_ratio": p99_ratio,
        "target_p99_ratio": TARGET_HOT_P99_RATIO,
        # A call that did not reach Redis returns in microseconds: such a run proves nothing.
        "ok": p99_ratio is not None
        and p99_ratio <= TARGET_HOT_P99_RATIO
        and failed == 0
        and async_failed == 0,
        "not_sent": failed,
        "async_record_query": aio,
        "async_raw_xadd": aio_base,
        "async_p50_ratio": _ratio(aio["p50_us"], aio_base["p50_us"]),
        "async_p99_ratio": _ratio(aio["p99_us"], aio_base["p99_us"]),
        "async_not_sent": async_failed,
    }


def _direct_producer(settings: Settings, spill_dir: Path) -> Settings:
    """Producer settings for the comparison with a raw XADD: direct mode (one XADD on the
    caller's thread; background mode would be timing a buffer append, not a round trip), and a
    spill directory of the bench's own, so other targets' spilled entries stay out of it."""
    update: dict[str, Any] = {}
    # Checked by name: the producer's options grow independently of the benchmark.
    if "producer_mode" in Settings.model_fields:
        update["producer_mode"] = "direct"
    if "spill_dir" in Settings.model_fields:
        update["spill_dir"] = spill_dir
    return settings.model_copy(update=update)


async def _hot_path_async(
    settings: Settings,
    kwargs: Sequence[dict[str, Any]],
    payloads: Sequence[bytes],
    warm: int,
    advance: Callable[[int], None],
) -> tuple[list[int], list[int], int]:
    """The asyncio client against an asyncio raw XADD; same interleaving as the sync pass."""
    stream = wire.stream_key(settings.stream_prefix, KIND)
    field_ = wire.PAYLOAD_FIELD
    client = AsyncClient.from_env(settings)
    raw = aioredis.Redis.from_url(settings.require_redis_url(), **redis_options(settings))
    timed_client: list[int] = []
    timed_raw: list[int] = []
    failed = 0
    total = len(kwargs)
    try:
        for i in range(warm):
            await client.record_query(**kwargs[i])
            await raw.xadd(stream, {field_: payloads[i]})
        advance(warm)
        gc.collect()
        clock = time.perf_counter_ns
        for start in range(warm, total, HOT_BLOCK):
            block = range(start, min(start + HOT_BLOCK, total))
            for i in block:
                t0 = clock()
                await raw.xadd(stream, {field_: payloads[i]})
                timed_raw.append(clock() - t0)
            for i in block:
                t0 = clock()
                receipt = await client.record_query(**kwargs[i])
                timed_client.append(clock() - t0)
                failed += receipt.outcome is not Outcome.SENT
            advance(len(block))
    finally:
        await client.close()
        await raw.aclose()
    return timed_client, timed_raw, failed


# --- backlog records ------------------------------------------------------------------------


@dataclass
class _Backlog:
    payloads: list[bytes]
    """Encoded stream payloads, exactly as a client would XADD them."""
    ids: list[str]


def _make_backlog(b: _Bench, count: int) -> _Backlog:
    payloads: list[bytes] = []
    ids: list[str] = []
    started = time.perf_counter()
    with _progress(b.console) as progress:
        task = progress.add_task("generating records", total=count, info="")
        for i, kw in enumerate(traffic.queries(count, seed=7)):
            record = _query_record(kw)
            ids.append(record["id"])
            payloads.append(wire.encode(record))
            if i % 5000 == 4999:
                progress.advance(task, 5000)
    b.console.print(
        f"generated {count:,} query records "
        f"(mean {sum(map(len, payloads)) / max(count, 1):,.0f} B) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return _Backlog(payloads, ids)


# --- 2a. the idempotent COPY ceiling ---------------------------------------------------------


def _ceiling(b: _Bench, backlog: _Backlog) -> dict[str, Any]:
    kind = kinds.get(KIND)
    codec = RowCodec(kind.table)
    q = kind_sql(kind.table, codec.columns)
    n = b.settings.batch_max_entries
    count = len(backlog.payloads)
    with _progress(b.console) as progress:
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
                result = write_batch(conn, q, rows[lo : lo + n], [], _no_dead_letters)
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
    return {
        "rows": count,
        "batch_rows": n,
        "seconds": round(total_s, 3),
        "rows_per_s": round(rate),
        "rows_per_s_incl_first_batch": round(count / total_s),
        "decode_validate_us_per_row": round(build_s / max(count, 1) * 1e6, 2),
        "cpu": {
            "python_us_per_row": round(own_cpu / count * 1e6, 1),
            "postgres_us_per_row": None
            if backend_cpu is None
            else round(backend_cpu / count * 1e6, 1),
        },
    }


# --- 2b / 4. the drain, with worker memory ---------------------------------------------------


@dataclass
class _Timeline:
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


def _preload(b: _Bench, payloads: Sequence[bytes]) -> float:
    started = time.perf_counter()
    pipe = b.admin_redis.pipeline(transaction=False)
    with _progress(b.console) as progress:
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


def _wait_committed(
    b: _Bench,
    label: str,
    total: int,
    committed: Callable[[], int],
    watched: Sequence[processes.Process],
    rss: RssSampler | None,
) -> _Timeline:
    """Poll ``committed()`` every POLL_S until it reaches ``total``; sample RSS on the way."""
    timeline = _Timeline(started=time.perf_counter())
    if rss is not None:
        rss.started = timeline.started
    last_change = timeline.started
    with _progress(b.console) as progress:
        task = progress.add_task(f"{label:<18}", total=total, info="")
        while True:
            now = time.perf_counter()
            done = committed()
            previous = timeline.last
            timeline.observe(now, done)
            if previous is None or done != previous[1]:
                last_change = now
            mb = rss.maybe_sample(now) if rss is not None else None
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
        rss.maybe_sample(time.perf_counter(), force=True)
    return timeline


def _drain(b: _Bench, backlog: _Backlog, count: int, label: str) -> dict[str, Any]:
    payloads = backlog.payloads[:count]
    b.reset_tables()
    b.reset_redis()
    preload_s = _preload(b, payloads)
    env = worker_env(b.settings)
    (b.log_dir / "celerybeat-schedule").unlink(missing_ok=True)
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
        timeline = _wait_committed(b, f"draining {label}", count, committed, started, rss)
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
        "worker_us_per_row": None if worker_cpu is None else round(worker_cpu / count * 1e6, 1),
        "postgres_us_per_row": None
        if postgres_cpu is None
        else round(postgres_cpu / count * 1e6, 1),
        "redis_us_per_row": round(redis_cpu / count * 1e6, 1),
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


# --- 3. the celery-batches baseline ----------------------------------------------------------


def _baseline(b: _Bench, backlog: _Backlog, count: int) -> dict[str, Any]:
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
    with _progress(b.console) as progress:
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
        "worker.bench_baseline",
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

        timeline = _wait_committed(b, "draining baseline", count, committed, [worker], None)
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


# --- the run --------------------------------------------------------------------------------


@contextlib.contextmanager
def _bench_context(
    settings: Settings,
    console: Console,
    *,
    data_dir: Path | None,
    database: str,
    broker_db: int,
    concurrency: int,
) -> Iterator[_Bench]:
    data_dir = (data_dir or settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with demo_endpoints(settings, data_dir, console) as ep:
        # The endpoint's server, not its database: the bench gets a database of its own.
        db_url = ensure_database(ep.database_url, database, recreate=True)
        bench_settings = settings.model_copy(
            update={
                "database_url": db_url,
                "redis_url": ep.redis_url,
                "broker_url": broker_url_for(ep.redis_url, broker_db),
                "stream_prefix": BENCH_STREAM_PREFIX,
            }
        )
        migrations.upgrade(bench_settings.sqlalchemy_url())
        admin_redis = redis.Redis.from_url(ep.redis_url)
        broker_redis = redis.Redis.from_url(bench_settings.celery_broker_url)
        b = _Bench(
            settings=bench_settings,
            admin_redis=admin_redis,
            broker_redis=broker_redis,
            console=console,
            log_dir=data_dir / "bench-logs",
            concurrency=concurrency,
        )
        b.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            b.reset_redis()
            yield b
        finally:
            b.reset_redis()
            admin_redis.close()
            broker_redis.close()


def _load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _machine(b: _Bench) -> dict[str, Any]:
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
) -> dict[str, Any]:
    """Run every measurement (module doc), print the table, return the figures.

    ``baseline_entries``: events for the celery-batches baseline (default ``min(entries,
    20_000)``). ``compare_entries``: backlog of a second, smaller drain for the memory
    comparison (default ``entries // 4`` when ``entries`` ≥ 100,000, else none; 0 skips it).
    ``database`` / ``broker_db``: where the bench keeps its rows and its Celery messages.
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
    with _bench_context(
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
            "logs": str(b.log_dir),
        }
        # The hot path first, while this process is small: later phases hold the backlog in
        # memory, and full collections over it would show up as hot-path latency.
        result["hot_path"] = _hot_path(b, calls)
        b.reset_redis()
        backlog = _make_backlog(b, entries)
        ceiling = _ceiling(b, backlog)
        drain = _drain(b, backlog, entries, "backlog")
        drain["ceiling"] = ceiling
        ratio = _ratio(drain["rows_per_s"], ceiling["rows_per_s"])
        drain["ratio_to_ceiling"] = ratio
        drain["target_ratio"] = TARGET_DRAIN_RATIO
        drain["aim_ratio"] = AIM_DRAIN_RATIO
        drain["ok"] = ratio is not None and ratio >= TARGET_DRAIN_RATIO
        result["drain"] = drain
        if compare_entries > 0:
            small = _drain(b, backlog, compare_entries, "small backlog")
            result["drain_small"] = small
            big_peak = drain["worker_rss"].get("peak_mb")
            small_peak = small["worker_rss"].get("peak_mb")
            result["rss_bounded"] = {
                "small_entries": compare_entries,
                "small_peak_mb": small_peak,
                "entries": entries,
                "peak_mb": big_peak,
                "peak_growth": _ratio(big_peak, small_peak),
                "backlog_growth": round(entries / compare_entries, 2),
            }
        if baseline:
            base = _baseline(b, backlog, baseline_entries)
            speedup = _ratio(drain["rows_per_s"], base["rows_per_s"])
            base["afterwrite_speedup"] = speedup
            base["target_speedup"] = TARGET_SPEEDUP
            base["ok"] = speedup is not None and speedup >= TARGET_SPEEDUP
            base["apply_async_p99_vs_record_query"] = _ratio(
                base["apply_async"].get("p99_us"), result["hot_path"]["record_query"]["p99_us"]
            )
            result["baseline"] = base
        del backlog
        # Rows are not kept between runs (the database is re-created anyway): free the disk.
        b.reset_tables()
    result["machine"]["load_avg_at_end"] = _load_avg()
    result["total_s"] = round(time.perf_counter() - run_started, 1)
    print_table(result, console)
    return result


# --- output ---------------------------------------------------------------------------------


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f} µs"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} rows/s"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}×"


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _ok(flag: bool | None) -> str:
    if flag is None:
        return ""
    return "[green]yes[/green]" if flag else "[red]NO[/red]"


def print_table(result: dict[str, Any], console: Console) -> None:
    """Print the figures of :func:`run_bench` as one table (measure, value, reference, ratio)."""
    cfg = result["config"]
    table = Table(
        title=f"afterwrite bench ({result['machine']['cpus']} CPUs, "
        f"PostgreSQL {result['machine']['postgres']}, Redis {result['machine']['redis']}, "
        f"{result['total_s']:.0f} s)"
    )
    for column in ("measure", "afterwrite", "reference", "ratio", "target", "met"):
        table.add_column(column, justify="left" if column == "measure" else "right")

    hot = result["hot_path"]
    rq, raw = hot["record_query"], hot["raw_xadd"]
    n = f"{hot['calls']:,} calls, {hot['payload_bytes_mean']:,} B"
    table.add_row(
        f"record_query p50 vs raw XADD ({n})",
        _us(rq["p50_us"]),
        _us(raw["p50_us"]),
        _x(hot["p50_ratio"]),
        "",
        "",
    )
    table.add_row(
        "record_query p99 vs raw XADD",
        _us(rq["p99_us"]),
        _us(raw["p99_us"]),
        _x(hot["p99_ratio"]),
        f"≤ {TARGET_HOT_P99_RATIO}×",
        _ok(hot["ok"]),
    )
    if hot["not_sent"] or hot["async_not_sent"]:
        table.add_row(
            "[red]record_query calls Redis did not take (sync / async)[/red]",
            f"{hot['not_sent']:,} / {hot['async_not_sent']:,}",
            "0",
            "",
            "0",
            _ok(False),
        )
    arq, araw = hot["async_record_query"], hot["async_raw_xadd"]
    table.add_row(
        "AsyncClient p50 vs async raw XADD",
        _us(arq["p50_us"]),
        _us(araw["p50_us"]),
        _x(hot["async_p50_ratio"]),
        "",
        "",
    )
    table.add_row(
        "AsyncClient p99 vs async raw XADD",
        _us(arq["p99_us"]),
        _us(araw["p99_us"]),
        _x(hot["async_p99_ratio"]),
        "",
        "",
    )
    base = result.get("baseline")
    if base:
        aa = base["apply_async"]
        table.add_row(
            "Celery apply_async p50 / p99 (per-event baseline)",
            f"{_us(aa.get('p50_us'))} / {_us(aa.get('p99_us'))}",
            f"record_query p99 {_us(rq['p99_us'])}",
            _x(base["apply_async_p99_vs_record_query"]),
            "",
            "",
        )

    d = result["drain"]
    c = d["ceiling"]
    table.add_section()
    table.add_row(
        f"drain {d['entries']:,} backlog, worker ×{cfg['worker_concurrency']} (first→last commit)",
        _rate(d["rows_per_s"]),
        f"ceiling {_rate(c['rows_per_s'])}",
        f"{(d['ratio_to_ceiling'] or 0) * 100:.0f}%",
        f"≥ {TARGET_DRAIN_RATIO:.0%} (aim {AIM_DRAIN_RATIO:.0%})",
        _ok(d["ok"]),
    )
    table.add_row(
        "  ceiling: COPY→staging→INSERT ON CONFLICT, 1 process",
        "",
        f"{c['batch_rows']:,}-row batches, {c['seconds']:.1f} s",
        "",
        "",
        "",
    )
    table.add_row(
        "  decode + validate (RowCodec), 1 process",
        f"{c['decode_validate_us_per_row']:.1f} µs/row",
        "",
        "",
        "",
        "",
    )
    dc, cc = d["cpu"], c["cpu"]
    table.add_row(
        "  CPU µs/row: worker / postgres / redis (drain)",
        f"{_num(dc['worker_us_per_row'])} / {_num(dc['postgres_us_per_row'])} / "
        f"{_num(dc['redis_us_per_row'])}",
        f"ceiling: python {_num(cc['python_us_per_row'])} / postgres "
        f"{_num(cc['postgres_us_per_row'])}",
        "",
        "",
        "",
    )
    table.add_row(
        "  machine busy CPUs while draining / load avg at start",
        _num(d.get("machine_busy_cpus"), 2),
        ", ".join(f"{v:.2f}" for v in result["machine"].get("load_avg_at_start") or []),
        "",
        "",
        "",
    )
    table.add_row(
        "  preload (pipelined XADD) / worker start-up",
        f"{d['preload_s']:.1f} s / {d.get('startup_s', 0):.1f} s",
        _rate(d["preload_rows_per_s"]),
        "",
        "",
        "",
    )
    table.add_row(
        "  rows stored exactly once",
        f"{d['rows']:,}",
        f"{d['entries']:,} sent",
        "",
        "all, once",
        _ok(d["exactly_once"]),
    )
    if base:
        table.add_row(
            f"drain vs celery-batches ({base['entries']:,} events, flush_every "
            f"{base['flush_every']:,})",
            _rate(d["rows_per_s"]),
            _rate(base["rows_per_s"]),
            _x(base["afterwrite_speedup"]),
            f"≥ {TARGET_SPEEDUP:.0f}×",
            _ok(base["ok"]),
        )
        table.add_row(
            "  baseline enqueue (apply_async per event, excluded)",
            f"{base['enqueue_s']:.1f} s",
            f"{base['enqueue_per_s'] or 0:,}/s",
            "",
            "",
            "",
        )
        table.add_row(
            "  baseline rows stored exactly once",
            f"{base['rows']:,}",
            f"{base['entries']:,} sent",
            "",
            "all, once",
            _ok(base["exactly_once"]),
        )

    rss = d["worker_rss"]
    if rss.get("available"):
        table.add_section()
        table.add_row(
            f"worker RSS start / peak / end ({rss['processes']} processes)",
            f"{rss['start_mb']:,.0f} / {rss['peak_mb']:,.0f} / {rss['end_mb']:,.0f} MiB",
            "",
            "",
            "bounded",
            "",
        )
        bounded = result.get("rss_bounded")
        if bounded and bounded["small_peak_mb"] is not None:
            growth = bounded["peak_growth"]
            table.add_row(
                f"worker RSS peak, {bounded['entries']:,} vs {bounded['small_entries']:,} backlog",
                f"{bounded['peak_mb']:,.0f} MiB",
                f"{bounded['small_peak_mb']:,.0f} MiB",
                _x(growth),
                f"≪ {bounded['backlog_growth']:.0f}×",
                _ok(growth is not None and growth < 1.25),
            )
            small = result["drain_small"]
            table.add_row(
                f"  drain rate at {small['entries']:,} backlog",
                _rate(small["rows_per_s"]),
                "",
                "",
                "",
                _ok(small["exactly_once"]),
            )
    console.print(table)
