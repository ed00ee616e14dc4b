"""``afterwrite bench``, phase 1: the producer's hot path against a raw ``XADD``.

``Client.record_query(**kwargs)`` with realistic kwargs against a raw redis-py ``XADD`` of the
same encoded payload to the same stream, over a connection with the same options; each call
timed with ``perf_counter_ns`` after a warm-up, the two interleaved in blocks of
:data:`HOT_BLOCK` calls. The same for :class:`producer.AsyncClient` against an asyncio raw
``XADD``.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from afterwrite.core import wire
from afterwrite.core.settings import Settings
from afterwrite.demo import traffic
from afterwrite.demo.run import progress_bar
from afterwrite.producer import AsyncClient, Client, Outcome
from afterwrite.producer.client import redis_options
from benchmarks.context import KIND, Bench
from benchmarks.report import TARGET_HOT_P99_RATIO, latency_summary, ratio_of

HOT_BLOCK = 100


def measure_hot_path(b: Bench, calls: int) -> dict[str, Any]:
    warm = min(1000, max(100, calls // 10))
    kwargs = list(traffic.queries(warm + calls, seed=11))
    # The raw XADD sends the bytes record_query would have built for the same kwargs.
    payloads = [wire.encode(traffic.as_record(kw)) for kw in kwargs]
    settings = _direct_producer(b.settings, b.log_dir.parent / "bench-spill")
    url = settings.require_redis_url()
    field_ = wire.PAYLOAD_FIELD
    stream = b.stream

    client = Client.from_env(settings)
    raw = redis.Redis.from_url(url, **redis_options(settings))
    sync_client: list[int] = []
    sync_raw: list[int] = []
    failed = 0
    with progress_bar(b.console) as progress:
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
    p99_ratio = ratio_of(sync["p99_us"], sync_base["p99_us"])
    return {
        "calls": calls,
        "warmup_calls": warm,
        "payload_bytes_mean": round(sum(map(len, payloads)) / len(payloads)),
        "record_query": sync,
        "raw_xadd": sync_base,
        "p50_ratio": ratio_of(sync["p50_us"], sync_base["p50_us"]),
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
        "async_p50_ratio": ratio_of(aio["p50_us"], aio_base["p50_us"]),
        "async_p99_ratio": ratio_of(aio["p99_us"], aio_base["p99_us"]),
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
    raw = aioredis.Redis.from_url(
        settings.require_redis_url(), **redis_options(settings, asyncio=True)
    )
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
