"""Celery tasks. Thin: find the process's runtime, take a drainer slot, call the drain.

Every task returns a small JSON dict of what it did (kind, entries, rows, dead letters,
duration, lag), which Flower shows with the task.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
import redis

from afterwrite.core import kinds as kind_names
from afterwrite.core import logs, wire
from afterwrite.models.embedding import EMBED_KIND
from afterwrite.models.registry import kinds
from afterwrite.worker import problems, slots, work_flags
from afterwrite.worker.app import (
    DISPATCH_TASK,
    DRAIN_TASK,
    EMBED_TASK,
    INDEX_REBUILD_TASK,
    INDEX_REFRESH_TASK,
    RECLAIM_TASK,
    RETENTION_TASK,
    app,
    frequent_expiry_s,
)
from afterwrite.worker.embedding.stage import embed_time_limit_s
from afterwrite.worker.errors import Failure, classify
from afterwrite.worker.operations.retention import run_retention
from afterwrite.worker.operations.store_retention import run_store_retention
from afterwrite.worker.runtime import Runtime, consumer_name

log = logging.getLogger("afterwrite.tasks")


def _runtime() -> Runtime:
    holder = app.afterwrite
    runtime: Runtime = holder.get()
    return runtime


def _task(action: str, kind: str) -> str:
    """The task's name for its pause and its problem record. Kind names sent by a stranger to
    the broker share one, so they cannot grow either."""
    if kind != "*" and not kind_names.is_known(kind):
        kind = "(unknown kind)"
    return problems.task_id(action, kind)


def _still_stopped(rt: Runtime, task: str) -> bool:
    """A paused task tries again at once when its problem was cleared (``afterwrite migrate``,
    or another worker's success); with Redis away it stays paused."""
    try:
        return problems.is_reported(rt.redis, rt.settings.stream_prefix, task)
    except redis.RedisError:
        return True


def _kind_blocked(rt: Runtime, kind: str) -> bool:
    try:
        return problems.blocks_kind(problems.read(rt.redis, rt.settings.stream_prefix), kind)
    except redis.RedisError:
        return False  # the reclaim itself will meet the same error, as a transient one


def _stop(rt: Runtime, kind: str, action: str, failure: Failure, exc: Exception) -> float:
    """Pause this task for a growing while, record the problem where ``health`` and
    ``status`` see it, and log it loudly once (later repeats of the same error at DEBUG)."""
    task = _task(action, kind)
    delay = rt.stopped(f"config:{task}", problems.pause_s)
    try:
        news = problems.report(
            rt.redis, rt.settings.stream_prefix, task, exc, consumer_name(), delay
        )
    except redis.RedisError:
        news = True
    log.log(
        logging.ERROR if news else logging.DEBUG,
        "%s of %s stopped (%s): %s; fix the setup (afterwrite status shows it); retry in %.0fs",
        action,
        kind,
        failure.value,
        logs.mask(str(exc)),
        delay,
        extra={"action": action, "kind": kind, "failure": failure.value},
    )
    return delay


def _guarded(
    kind: str,
    action: str,
    work: Callable[[Runtime], dict[str, Any]],
    *,
    backoff: str = "store",
) -> dict[str, Any]:
    """Run one task's ``work`` with the failure policy of afterwrite.worker.errors.

    Transient failures back off (``backoff`` names the pause: a kind's drains and reclaims
    share one, the embedder and the index tasks have their own). Configuration failures stop
    the task for a growing pause (afterwrite.worker.problems); the first one raises, so Celery and
    Flower show it failed, and repeats return quietly.
    """
    rt = _runtime()
    if backoff == "store":
        # per kind: one kind's trouble (a full table, a poison batch) must not pause the others
        backoff = f"store:{kind}"
    task = _task(action, kind)
    stuck = f"config:{task}"
    if rt.backing_off(stuck) > 0 and _still_stopped(rt, task):
        return {"kind": kind, "skipped": "stopped by a configuration error (afterwrite status)"}
    wait_s = rt.backing_off(backoff)
    if wait_s > 0:
        return {"kind": kind, "skipped": f"backing off {wait_s:.1f}s after a failure"}
    if action == "reclaim" and _kind_blocked(rt, kind):
        # Claiming would count a delivery against entries that only wait for a fix.
        return {"kind": kind, "skipped": "a configuration problem stops this kind"}
    try:
        result: dict[str, Any] = work(rt)
    except Exception as exc:
        failure = classify(exc)
        # Flower shows these results: no connection string or key in them
        error = logs.mask(f"{type(exc).__name__}: {exc}")
        if failure is not Failure.TRANSIENT:
            first = rt.failures(stuck) == 0
            delay = _stop(rt, kind, action, failure, exc)
            if first:
                raise
            return {"kind": kind, "error": error, "stopped": failure.value, "retry_in_s": delay}
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
        return {"kind": kind, "error": error, "retry_in_s": delay}
    if rt.failures(stuck):
        rt.succeeded(stuck)
        with contextlib.suppress(redis.RedisError):
            problems.clear(rt.redis, rt.settings.stream_prefix, task)
        log.info("%s of %s works again", action, kind, extra={"action": action, "kind": kind})
    # Only a committed batch shows that Redis and PostgreSQL both work again: a reclaim that
    # found nothing idle, or a drain with nothing to do, must not reset the backoff.
    if result.get("batches", 0) > 0:
        rt.succeeded(backoff)
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
            report = rt.drain(kind).run(s.drain_budget_s)
        if kind == EMBED_KIND and report.inserted:
            work_flags.raise_flag(rt.redis, s.stream_prefix, work_flags.EMBED)
        return report.as_dict()

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
            stores = run_store_retention(conn, rt.settings, rt.redis)
        return {"kinds": [r.as_dict() for r in reports], "stores": [r.as_dict() for r in stores]}

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
            stage = rt.embed_stage()
            work_flags.take(rt.redis, s.stream_prefix, work_flags.EMBED)
            try:
                report = stage.run(s.drain_budget_s)
            except Exception:
                work_flags.raise_flag(rt.redis, s.stream_prefix, work_flags.EMBED)  # retry it
                rt.db.discard_if_broken()
                raise
            if report.batches:  # the budget may have ended with jobs left: look once more
                work_flags.raise_flag(rt.redis, s.stream_prefix, work_flags.EMBED)
            if stage.touched:
                work_flags.raise_flag(rt.redis, s.stream_prefix, work_flags.INDEX)
            _build_new_collections(rt, stage.touched)
            stage.touched.clear()
            return report.as_dict()

    return _guarded("embed", "embed", work, backoff="embed")


FIRST_BUILD_RESEND_S = 60.0


def _build_new_collections(rt: Runtime, touched: set[str]) -> None:
    """A collection's first vectors start its first build at once: it answers searches within
    seconds of its first documents, not after the next rebuild tick (up to a minute later).
    Collections already published get their changes from the refresh task's deltas."""
    from afterwrite.vectorindex import files
    from afterwrite.worker.index import publish

    now = time.monotonic()
    new = [
        c
        for c in sorted(touched)
        if not (publish.collection_dir(rt.settings.index_path, c) / files.MANIFEST).exists()
        and now - rt.first_builds.get(c, -FIRST_BUILD_RESEND_S) >= FIRST_BUILD_RESEND_S
    ]
    if not new:
        return
    for c in new:
        rt.first_builds[c] = now
    log.info(
        "first vectors of %s: building the index now",
        ", ".join(new),
        extra={"action": "first_build", "collections": new},
    )
    index_rebuild.delay()


@app.task(name=INDEX_REBUILD_TASK, soft_time_limit=900, time_limit=960)
def index_rebuild() -> dict[str, Any]:
    """Rebuild and publish the index of every collection that changed since its last build."""
    from afterwrite.worker.index.jobs import rebuild_changed

    def work(rt: Runtime) -> dict[str, Any]:
        return {"kind": "*", "collections": rebuild_changed(rt.settings)}

    return _guarded("*", "index_rebuild", work, backoff="index")


@app.task(name=INDEX_REFRESH_TASK)
def index_refresh() -> dict[str, Any]:
    """Publish what changed since each collection's last build (searchable within seconds)."""
    from afterwrite.worker.index.jobs import refresh_deltas

    def work(rt: Runtime) -> dict[str, Any]:
        work_flags.take(rt.redis, rt.settings.stream_prefix, work_flags.INDEX)
        try:
            return {"kind": "*", "collections": refresh_deltas(rt.settings)}
        except Exception:
            work_flags.raise_flag(rt.redis, rt.settings.stream_prefix, work_flags.INDEX)
            raise

    return _guarded("*", "index_refresh", work, backoff="index")


DISPATCH_FALLBACK_S = 30.0
"""Embedding and index refresh run at least this often even without a flag (a flag lost
with a Redis restart, vectors written by hand)."""


@app.task(name=DISPATCH_TASK)
def dispatch() -> dict[str, Any]:
    """Send the drains, the embedding run and the index refresh that have work, and nothing
    else: one round trip reads every stream's length and the work flags. Beat sends this
    every ``drain_interval_s``; an idle pipeline then runs about one task a second."""
    rt = _runtime()
    s = rt.settings
    names = list(kinds.names())
    flags = [work_flags.key(s.stream_prefix, w) for w in (work_flags.EMBED, work_flags.INDEX)]
    try:
        pipe = rt.redis.pipeline(transaction=False)
        for name in names:
            pipe.xlen(wire.stream_key(s.stream_prefix, name))
        pipe.mget(flags)
        *lengths, (embed_flag, index_flag) = pipe.execute()
    except redis.RedisError as exc:
        return {"error": logs.mask(f"{type(exc).__name__}: {exc}")}
    now = time.monotonic()
    sent = [name for name, n in zip(names, lengths, strict=True) if n]
    for name in sent:
        drain.apply_async((name,), expires=frequent_expiry_s(s.drain_interval_s))
    for task, flag, every_s in (
        (embed, embed_flag, s.embedding_interval_s),
        (index_refresh, index_flag, s.index_refresh_interval_s),
    ):
        last = rt.dispatched.get(task.name, -1e18)
        due = flag is not None or now - last >= DISPATCH_FALLBACK_S
        if due and now - last >= every_s:
            rt.dispatched[task.name] = now
            task.apply_async(expires=frequent_expiry_s(every_s))
            sent.append(task.name)
    return {"sent": sent}
