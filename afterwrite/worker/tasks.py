"""Celery tasks. Thin: find the process's runtime, take a drainer slot, call the drain.

Every task returns a small JSON dict of what it did (kind, entries, rows, dead letters,
duration, lag), which Flower shows with the task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import psycopg

from afterwrite.core import logs
from afterwrite.models.registry import kinds
from afterwrite.worker import slots
from afterwrite.worker.app import (
    DRAIN_TASK,
    EMBED_TASK,
    INDEX_REBUILD_TASK,
    INDEX_REFRESH_TASK,
    RECLAIM_TASK,
    RETENTION_TASK,
    app,
)
from afterwrite.worker.embedding.stage import embed_time_limit_s
from afterwrite.worker.errors import Failure, classify
from afterwrite.worker.operations.retention import run_retention
from afterwrite.worker.runtime import Runtime

log = logging.getLogger("afterwrite.tasks")


def _runtime() -> Runtime:
    holder = app.afterwrite
    runtime: Runtime = holder.get()
    return runtime


def _guarded(
    kind: str,
    action: str,
    work: Callable[[Runtime], dict[str, Any]],
    *,
    backoff: str = "store",
) -> dict[str, Any]:
    rt = _runtime()
    stuck = f"config:{action}:{kind}"  # this task's own pause after a configuration failure
    wait_s = max(rt.backing_off(backoff), rt.backing_off(stuck))
    if wait_s > 0:
        return {"kind": kind, "skipped": f"backing off {wait_s:.1f}s after a failure"}
    try:
        result: dict[str, Any] = work(rt)
    except Exception as exc:
        failure = classify(exc)
        if failure is not Failure.TRANSIENT:
            # Not retried at once either: the next kicks (every second) would repeat the same
            # error (and, for a provider, the same refused request) until someone fixes it.
            rt.failed(stuck)
            log.error(
                "%s of %s failed (%s): %s",
                action,
                kind,
                failure.value,
                exc,
                extra={"action": action, "kind": kind, "failure": failure.value},
            )
            raise
        delay = rt.failed(backoff)
        log.warning(
            "%s of %s failed (%s: %s); entries stay pending; retrying in %.1fs",
            action,
            kind,
            type(exc).__name__,
            exc,
            delay,
            extra={"action": action, "kind": kind, "failure": "transient"},
        )
        # Flower shows this result: no connection string or key in it
        error = logs.mask(f"{type(exc).__name__}: {exc}")
        return {"kind": kind, "error": error, "retry_in_s": delay}
    # Only a committed batch shows that Redis and PostgreSQL both work again: a reclaim that
    # found nothing idle, or a drain with nothing to do, must not reset the backoff.
    if result.get("batches", 0) > 0:
        rt.succeeded(backoff)
        rt.succeeded(stuck)
    return result


@app.task(name=DRAIN_TASK)
def drain(kind: str) -> dict[str, Any]:
    """Drain ``kind``'s stream until caught up or out of budget (at most N drainers/stream)."""

    def work(rt: Runtime) -> dict[str, Any]:
        kinds.get(kind)  # an unknown kind fails before anything touches Redis or PostgreSQL
        s = rt.settings
        ttl_ms = int((s.drain_budget_s + 2 * s.batch_timeout_s) * 1000)
        slot = slots.acquire(
            rt.redis, f"{s.stream_prefix}:drainers:{kind}", s.drainers_per_stream, ttl_ms
        )
        if slot is None:
            return {"kind": kind, "skipped": "all drainer slots busy"}
        with slot:
            return rt.drain(kind).run(s.drain_budget_s).as_dict()

    return _guarded(kind, "drain", work)


@app.task(name=RECLAIM_TASK)
def reclaim(kind: str) -> dict[str, Any]:
    """Take over and store entries a dead consumer left pending."""
    return _guarded(kind, "reclaim", lambda rt: rt.drain(kind).reclaim().as_dict())


@app.task(name=RETENTION_TASK)
def retention() -> dict[str, Any]:
    """Delete rows past their kind's retention, in short chunks, within a time budget."""

    def work(rt: Runtime) -> dict[str, Any]:
        with psycopg.connect(rt.settings.require_database_url(), autocommit=True) as conn:
            reports = run_retention(conn, list(kinds), rt.settings)
        return {"kinds": [r.as_dict() for r in reports]}

    return _guarded("*", "retention", work)


@app.task(name=EMBED_TASK)
def embed() -> dict[str, Any]:
    """Turn stored embedding jobs into vectors (see afterwrite.worker.embedding.stage)."""

    def work(rt: Runtime) -> dict[str, Any]:
        s = rt.settings
        ttl_ms = int((embed_time_limit_s(s) + s.batch_timeout_s) * 1000)
        slot = slots.acquire(rt.redis, f"{s.stream_prefix}:embedders", s.embedding_workers, ttl_ms)
        if slot is None:
            return {"kind": "embed", "skipped": "all embedding slots busy"}
        with slot:
            try:
                return rt.embed_stage().run(s.drain_budget_s).as_dict()
            except Exception:
                rt.db.discard_if_broken()
                raise

    return _guarded("embed", "embed", work, backoff="embed")


@app.task(name=INDEX_REBUILD_TASK, soft_time_limit=900, time_limit=960)
def index_rebuild() -> list[dict[str, Any]]:
    """Rebuild and publish the index of every collection that changed since its last build."""
    from afterwrite.worker.index.jobs import rebuild_changed

    return rebuild_changed(_runtime().settings)


@app.task(name=INDEX_REFRESH_TASK)
def index_refresh() -> list[dict[str, Any]]:
    """Publish what changed since each collection's last build (searchable within seconds)."""
    from afterwrite.worker.index.jobs import refresh_deltas

    return refresh_deltas(_runtime().settings)
