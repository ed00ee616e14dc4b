"""Producer figures: hot-path latency per mode, the cost of a spill, the replay rate.

:func:`measure_producer` runs against the Redis of ``settings`` under a stream prefix of its own
(:data:`BENCH_PREFIX`, deleted afterwards) and a temporary spill directory; it returns a
JSON-serialisable dict and can print it as a table (:func:`print_table`). ``afterwrite bench``
can call it next to its own phases; nothing here starts or stops servers.

What is measured:

- ``direct`` / ``background``: ``Client.record_query(**kwargs)`` with realistic kwargs
  (:func:`afterwrite.demo.traffic.queries`), each call timed with ``perf_counter_ns`` after a
  warm-up. Background mode twice: ``tight`` (calls back to back, far faster than any server records:
  the flusher competes for the GIL the whole time and the buffer overflows) and ``paced`` (blocks of
  :data:`BLOCK` calls with a 2 ms pause between, as a request handler that also waits on I/O; target
  p99 ≤ 20 µs). Paced figures also give the p99 without the first
  :data:`COLD_CALLS` calls of each block (``warm_p99_us``) and those calls' p50: after a pause
  caches are cold and any code runs about twice as slow.
- ``build_encode_paced``: building and encoding the record alone, paced the same way: the floor
  under both modes (every producer does this much per call).
- ``spill``: ``SpillJournal.append`` of the same encoded entries (one ``write(2)`` each, no fsync)
  and a direct-mode ``record_query`` while Redis is unreachable (the call's whole cost).
- ``replay``: entries spilled to a journal, then replayed into Redis through the batch sender
  (read + parse + one Lua call per 512 KiB), entries per second.
"""

from __future__ import annotations

import gc
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from afterwrite.core import wire
from afterwrite.core.settings import Settings
from afterwrite.producer.client import Client, redis_options
from afterwrite.producer.gate import Gate
from afterwrite.producer.records import query_record
from afterwrite.producer.sender import BatchSender, accepted_prefix
from afterwrite.spill.journal import SpillJournal

BENCH_PREFIX = "afterwrite-bench-producer"
BLOCK = 100
PAUSE_S = 0.002
COLD_CALLS = 3
"""The first calls after a pause run with cold caches (here ~2x slower, whatever the code)."""


def percentiles_us(samples_ns: Sequence[int]) -> dict[str, float]:
    """Nearest-rank p50 / p99 / p99.9 / max of per-call times, in microseconds."""
    ordered = sorted(samples_ns)
    n = len(ordered)

    def rank(q: float) -> float:
        return round(ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1000, 1)

    return {
        "p50_us": rank(0.50),
        "p99_us": rank(0.99),
        "p999_us": rank(0.999),
        "max_us": round(ordered[-1] / 1000, 1),
        "mean_us": round(sum(ordered) / n / 1000, 2),
    }


def _workload(count: int) -> list[dict[str, Any]]:
    from afterwrite.demo import traffic

    return list(traffic.queries(count, seed=11))


def _encoded(kwargs: dict[str, Any]) -> bytes:
    return wire.encode(query_record(**kwargs))


def _time_calls(
    call: Callable[[dict[str, Any]], object],
    kwargs: Sequence[dict[str, Any]],
    warm: int,
    *,
    pause_s: float = 0.0,
    cold: list[int] | None = None,
) -> list[int]:
    """Per-call times of ``call`` over ``kwargs[warm:]`` in blocks of :data:`BLOCK`, pausing
    ``pause_s`` between blocks; the first :data:`COLD_CALLS` of each block after a pause are
    also appended to ``cold``."""
    for kw in kwargs[:warm]:
        call(kw)
    gc.collect()
    clock = time.perf_counter_ns
    samples: list[int] = []
    timed = kwargs[warm:]
    for start in range(0, len(timed), BLOCK):
        for i, kw in enumerate(timed[start : start + BLOCK]):
            t0 = clock()
            call(kw)
            elapsed = clock() - t0
            samples.append(elapsed)
            if cold is not None and pause_s and i < COLD_CALLS:
                cold.append(elapsed)
        if pause_s:
            time.sleep(pause_s)
    return samples


def _build_and_encode(kw: dict[str, Any]) -> bytes:
    return _encoded(kw)


def _client(settings: Settings, **update: Any) -> Client:
    return Client.from_env(settings.model_copy(update=update))


def measure_producer(settings: Settings, calls: int = 20_000) -> dict[str, Any]:
    """Measure (module doc) with ``calls`` timed calls per figure; returns the figures."""
    if calls <= 0:
        raise ValueError("calls must be positive")
    warm = min(1000, max(100, calls // 10))
    kwargs = _workload(warm + calls)
    url = settings.require_redis_url()
    admin = redis.Redis.from_url(url)
    spill_dir = Path(tempfile.mkdtemp(prefix="afterwrite-bench-spill-"))
    base = settings.model_copy(update={"stream_prefix": BENCH_PREFIX, "spill_dir": spill_dir})
    result: dict[str, Any] = {"calls": calls, "warmup_calls": warm}
    try:
        with _client(base, producer_mode="direct", spill_dir=spill_dir / "direct") as c:
            result["direct"] = percentiles_us(
                _time_calls(lambda kw: c.record_query(**kw), kwargs, warm)
            )
        _delete_streams(admin)
        # What every producer must do per call whatever it does next: the floor for both modes.
        cold: list[int] = []
        floor = percentiles_us(
            _time_calls(_build_and_encode, kwargs, warm, pause_s=PAUSE_S, cold=cold)
        )
        floor["cold_p50_us"] = percentiles_us(cold)["p50_us"]
        result["build_encode_paced"] = floor
        for name, pause in (("background_tight", 0.0), ("background_paced", PAUSE_S)):
            cold = []
            with _client(base, producer_mode="background", spill_dir=spill_dir / name) as c:
                samples = _time_calls(
                    lambda kw: c.record_query(**kw), kwargs, warm, pause_s=pause, cold=cold
                )
                started = time.perf_counter()
                c.flush(60)
                figures: dict[str, Any] = dict(percentiles_us(samples))
                figures["flush_after_s"] = round(time.perf_counter() - started, 3)
                if cold:
                    figures["cold_p50_us"] = percentiles_us(cold)["p50_us"]
                    warm_only = [t for i, t in enumerate(samples) if i % BLOCK >= COLD_CALLS]
                    figures["warm_p99_us"] = percentiles_us(warm_only)["p99_us"]
                figures["stats"] = c.stats.snapshot()
                result[name] = figures
            _delete_streams(admin)
        result["spill"] = _spill_cost(base, kwargs, warm, spill_dir / "spill")
        result["replay"] = _replay_rate(base, kwargs, url, spill_dir / "replay")
        result["payload_bytes_mean"] = round(sum(len(_encoded(kw)) for kw in kwargs[:1000]) / 1000)
    finally:
        _delete_streams(admin)
        admin.close()
        shutil.rmtree(spill_dir, ignore_errors=True)
    return result


def _spill_cost(
    base: Settings, kwargs: Sequence[dict[str, Any]], warm: int, spill_dir: Path
) -> dict[str, Any]:
    entries = [_encoded(kw) for kw in kwargs]
    journal = SpillJournal(spill_dir / "journal" / "append", max_bytes=1 << 40)
    clock = time.perf_counter_ns
    samples: list[int] = []
    for i, entry in enumerate(entries):
        t0 = clock()
        journal.append("query", entry)
        if i >= warm:
            samples.append(clock() - t0)
    journal.close()
    # The whole call when Redis is unreachable: encode, the gate says no, the journal keeps it.
    down = base.model_copy(
        update={"redis_url": "redis://127.0.0.1:1/0", "spill_dir": spill_dir / "client"}
    )
    with Client.from_env(down) as c:
        call_samples = _time_calls(lambda kw: c.record_query(**kw), kwargs, warm)
    return {
        "append": percentiles_us(samples),
        "record_query_redis_down": percentiles_us(call_samples),
    }


def _replay_rate(
    base: Settings, kwargs: Sequence[dict[str, Any]], url: str, directory: Path
) -> dict[str, Any]:
    entries = [_encoded(kw) for kw in kwargs]
    journal = SpillJournal(directory, max_bytes=1 << 40)
    journal.append_many([("query", e) for e in entries])
    journal.close()
    conn = redis.Redis.from_url(url, **redis_options(base))
    gate = Gate(max_entries=base.stream_max_entries, cap_check_interval_s=1.0)
    sender = BatchSender(conn, gate, prefix=BENCH_PREFIX, max_entries=base.stream_max_entries)
    replayer = SpillJournal(directory, max_bytes=1 << 40)
    chunk = base.producer_flush_max_entries
    replayed = 0
    started = time.perf_counter()
    while True:
        n, _ = replayer.replay_once(lambda items: accepted_prefix(sender.send(items)), chunk)
        if n == 0:
            break
        replayed += n
    seconds = time.perf_counter() - started
    conn.close()
    return {
        "entries": replayed,
        "chunk_entries": chunk,
        "seconds": round(seconds, 3),
        "entries_per_s": round(replayed / seconds) if seconds > 0 else None,
    }


def _delete_streams(admin: redis.Redis) -> None:
    keys = list(admin.scan_iter(match=f"{BENCH_PREFIX}:*"))
    if keys:
        admin.delete(*keys)


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measure, p50, p99, note) rows for a small table."""
    rows = []
    for key, label in (
        ("direct", "record_query, direct mode"),
        ("build_encode_paced", "  floor: build + encode the record only (paced)"),
        ("background_paced", "record_query, background mode (paced)"),
        ("background_tight", "record_query, background mode (tight loop)"),
    ):
        f = result[key]
        note = ""
        if "warm_p99_us" in f:
            note = f"warm p99 {f['warm_p99_us']:.1f} µs; "
        if "cold_p50_us" in f:
            note += f"first calls after a pause p50 {f['cold_p50_us']:.1f} µs"
        if key == "background_tight":
            note = f"buffer full: {f['stats']['buffer_full']:,} spilled by the caller"
        rows.append((label, f"{f['p50_us']:.1f} µs", f"{f['p99_us']:.1f} µs", note))
    spill = result["spill"]
    rows.append(
        (
            "spill: SpillJournal.append (1 write, no fsync)",
            f"{spill['append']['p50_us']:.1f} µs",
            f"{spill['append']['p99_us']:.1f} µs",
            f"mean {spill['append']['mean_us']:.1f} µs/entry",
        )
    )
    down = spill["record_query_redis_down"]
    rows.append(
        (
            "spill: record_query while Redis is down",
            f"{down['p50_us']:.1f} µs",
            f"{down['p99_us']:.1f} µs",
            "whole call, direct mode",
        )
    )
    r = result["replay"]
    rows.append(
        (
            f"replay {r['entries']:,} entries ({r['chunk_entries']} per chunk)",
            f"{r['entries_per_s']:,} entries/s",
            "",
            f"{r['seconds']:.2f} s",
        )
    )
    return rows


def print_table(result: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"producer ({result['calls']:,} calls, {result['payload_bytes_mean']:,} B entries)"
    )
    for column in ("measure", "p50 / rate", "p99", "note"):
        table.add_column(column, justify="left" if column in {"measure", "note"} else "right")
    for row in table_rows(result):
        table.add_row(*row)
    (console or Console()).print(table)
