"""``afterwrite bench``: what an idle pipeline costs (a worker and beat with nothing to do).

A real worker and beat are started on empty streams; after :data:`SETTLE_S` (start-up, the
first ticks) their process trees' CPU time is read from ``/proc`` at the start and the end of a
window of ``seconds`` (60 by default), with what Redis (``INFO``: CPU and commands) and the
worker's PostgreSQL backends spent meanwhile. Target: worker + beat ≤ 2 % of one core.

Redis's figures are the whole server's: on a Redis shared with other clients they include
theirs (the idle pipeline's own share is at most that).
"""

from __future__ import annotations

import time
from typing import Any

from afterwrite.demo import processes
from benchmarks.context import Bench, BenchError, worker_env
from benchmarks.procfs import sample_tree

SETTLE_S = 15.0
TARGET_IDLE_PCT = 2.0
"""Worker + beat CPU while idle, in percent of one core."""


def _tree_cpu_s(pid: int) -> float:
    sample = sample_tree(pid)
    if sample is None:
        raise BenchError("idle CPU needs /proc (Linux)")
    return sum(sample.cpu_s.values())


def _redis_counters(b: Bench) -> tuple[float, int]:
    cpu: Any = b.admin_redis.info("cpu")
    stats: Any = b.admin_redis.info("stats")
    used = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return used, int(stats["total_commands_processed"])


def measure_idle(b: Bench, seconds: float) -> dict[str, Any]:
    """CPU of an idle worker and beat over ``seconds``, in percent of one core."""
    from benchmarks.drain import _backend_cpu_s

    b.reset_tables()
    b.reset_redis()
    env = worker_env(b.settings)
    started: list[processes.Process] = []
    try:
        worker = processes.start_worker(env, b.log_dir, concurrency=b.concurrency, name="idle")
        started.append(worker)
        beat = processes.start_beat(env, b.log_dir)
        started.append(beat)
        b.console.print(f"idle pipeline: settling {SETTLE_S:.0f} s, then measuring {seconds:.0f} s")
        time.sleep(SETTLE_S)
        for p in started:
            if not p.alive():
                raise BenchError(f"{p.name} exited ({p.proc.returncode}):\n{p.tail()}")
        w0, beat0 = _tree_cpu_s(worker.pid), _tree_cpu_s(beat.pid)
        r0, c0 = _redis_counters(b)
        pg0 = _backend_cpu_s(b.db_url, "afterwrite-worker:")
        t0 = time.perf_counter()
        time.sleep(seconds)
        window_s = time.perf_counter() - t0
        w1, beat1 = _tree_cpu_s(worker.pid), _tree_cpu_s(beat.pid)
        r1, c1 = _redis_counters(b)
        pg1 = _backend_cpu_s(b.db_url, "afterwrite-worker:")
    finally:
        for p in started:
            p.stop()

    def pct(cpu_s: float) -> float:
        return round(cpu_s / window_s * 100, 2)

    total = pct((w1 - w0) + (beat1 - beat0))
    # Backends can come and go in the window; only a pair of readings is comparable.
    postgres = None if pg0 is None or pg1 is None or pg1 < pg0 else pct(pg1 - pg0)
    figures = {
        "seconds": round(window_s, 1),
        "worker_pct": pct(w1 - w0),
        "beat_pct": pct(beat1 - beat0),
        "pipeline_pct": total,
        "redis_pct": pct(r1 - r0),
        "redis_commands_per_s": round((c1 - c0) / window_s, 1),
        "postgres_pct": postgres,
        "target_pct": TARGET_IDLE_PCT,
        "ok": total <= TARGET_IDLE_PCT,
    }
    b.console.print(
        f"idle: worker {figures['worker_pct']} % + beat {figures['beat_pct']} % of one core; "
        f"redis {figures['redis_pct']} % ({figures['redis_commands_per_s']} commands/s)"
    )
    return figures
