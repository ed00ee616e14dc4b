"""The benchmark's baseline: one Celery message per event, batched by ``celery_batches``.

This is the pattern afterwrite replaces (see the design's measurements table): the request
handler calls ``apply_async`` with the record as a JSON task argument; a worker buffers the
messages in a :class:`celery_batches.Batches` task (``flush_every`` 2,000, ``flush_interval``
1 s) and stores each flushed buffer with the *same* code the afterwrite drain uses
(:class:`afterwrite.worker.ingest.rows.RowCodec`, then
:func:`afterwrite.worker.ingest.batch_writer.write_batch`: COPY → staging → ``INSERT … ON CONFLICT
(id) DO NOTHING`` → COMMIT). Only the transport differs, so the comparison measures what a Celery
message per event costs.

Run by the benchmark as ``celery -A benchmarks.celery_baseline worker -Q afterwrite-bench-baseline``
with the usual ``AFTERWRITE_*`` variables. After every commit the task adds the rows it stored
to a Redis counter (:func:`committed_key`), which the benchmark polls to time first to last
commit without querying the table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery
from celery_batches import Batches

from afterwrite.core.settings import Settings, load_settings
from afterwrite.models.registry import kinds
from afterwrite.worker.ingest.batch_writer import Rejection, write_batch
from afterwrite.worker.ingest.database import Database
from afterwrite.worker.ingest.dead_letters import DeadEntry
from afterwrite.worker.ingest.rows import Invalid, RowCodec
from afterwrite.worker.ingest.sql import KindSql, kind_sql

QUEUE = "afterwrite-bench-baseline"
TASK = "afterwrite.bench.baseline_store"
FLUSH_EVERY = 2000
FLUSH_INTERVAL_S = 1.0


def committed_key(stream_prefix: str) -> str:
    """Redis counter of rows the baseline committed (INCRBY after each COMMIT)."""
    return f"{stream_prefix}:baseline:committed"


def rejected_key(stream_prefix: str) -> str:
    """Redis counter of records the baseline could not store (invalid or refused)."""
    return f"{stream_prefix}:baseline:rejected"


def celery_config(broker_url: str) -> dict[str, Any]:
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_default_queue": QUEUE,
        # celery-batches needs the worker to hold more unacknowledged messages than
        # flush_every; 0 lifts the prefetch limit (as its documentation prescribes).
        "worker_prefetch_multiplier": 0,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
    }


class _State:
    """Per worker process: settings, a PostgreSQL connection, the query kind's codec and SQL.

    Built on first use in the pool child (never inherited across the fork), like
    :class:`afterwrite.worker.runtime.Runtime`.
    """

    def __init__(self, settings: Settings) -> None:
        table = kinds.get("query").table
        self.settings = settings
        self.codec = RowCodec(table)
        self.sql: KindSql = kind_sql(table, self.codec.columns)
        self.db = Database(
            settings.require_database_url(),
            statement_timeout_s=settings.batch_timeout_s,
            application_name=f"afterwrite-bench-baseline:{os.getpid()}",
        )
        self.redis = redis.Redis.from_url(settings.require_redis_url())


_state: tuple[int, _State] | None = None


def _get_state() -> _State:
    global _state  # noqa: PLW0603 (one lazily built object per process, reset after fork)
    if _state is None or _state[0] != os.getpid():
        _state = (os.getpid(), _State(load_settings()))
    return _state[1]


def no_dead_letters(_rejections: Sequence[Rejection]) -> list[DeadEntry]:
    """``write_batch``'s dead-letter callback for writers that keep none: this baseline only
    counts refused rows (:func:`rejected_key`); the benchmark's COPY ceiling writes valid rows
    only."""
    return []


def store(requests: Sequence[Any]) -> int:
    """The Batches task body: validate every buffered record, write them in one transaction,
    then count them as committed. Returns the number of rows written."""
    st = _get_state()
    rows: list[tuple[Any, ...]] = []
    bad = 0
    for request in requests:
        try:
            rows.append(st.codec.row(request.args[0]))
        except (Invalid, IndexError):
            bad += 1
    conn = st.db.connection(st.sql)
    try:
        result = write_batch(conn, st.sql, rows, [], no_dead_letters)
    except Exception:
        st.db.discard_if_broken()
        raise
    bad += len(result.rejected)
    stored = len(rows) - len(result.rejected)
    pipe = st.redis.pipeline(transaction=False)
    pipe.incrby(committed_key(st.settings.stream_prefix), stored)
    if bad:
        pipe.incrby(rejected_key(st.settings.stream_prefix), bad)
    pipe.execute()
    return stored


class _ConfiguredFromEnv(Celery):  # type: ignore[misc]  # Celery is untyped
    """Reads ``AFTERWRITE_*`` when Celery first needs its configuration.

    A method, not an ``on_configure`` signal receiver: Celery logs and swallows exceptions of
    signal receivers, so bad settings would leave the worker on its default (amqp) broker
    instead of stopping it with the message naming the variable.
    """

    def on_configure(self) -> None:
        self.conf.update(celery_config(load_settings().celery_broker_url))


def make_app(broker_url: str | None = None) -> Any:
    """A Celery app with the baseline task registered.

    With ``broker_url`` (the benchmark's producer side) the app is configured from it and reads
    no environment; without (``celery -A benchmarks.celery_baseline``), from ``AFTERWRITE_*``
    variables when Celery first needs its configuration.
    """
    if broker_url is None:
        celery: Any = _ConfiguredFromEnv("afterwrite_bench_baseline")
    else:
        celery = Celery("afterwrite_bench_baseline", set_as_current=False)
        celery.conf.update(celery_config(broker_url))
    celery.task(
        name=TASK,
        base=Batches,
        flush_every=FLUSH_EVERY,
        flush_interval=FLUSH_INTERVAL_S,
        # The message is acknowledged when its buffer is handed to the pool (celery-batches'
        # default, as in the measured baseline).
        acks_late=False,
    )(store)
    return celery


app = make_app()
