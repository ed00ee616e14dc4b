"""Retention of the stores that are not a kind's table: the embedding cache and index versions.

Run by the retention task after the kinds and the dead letters
(:func:`afterwrite.worker.operations.retention.run_retention`), each with its own setting:

- ``AFTERWRITE_EMBEDDING_CACHE_RETENTION_DAYS`` (90): cache entries older than this that no
  live embedding uses are deleted in chunks (an entry a live document uses holds nothing that
  document's own row does not; its text embedded again costs one provider call);
- ``AFTERWRITE_INDEX_VERSION_RETENTION_DAYS`` (30): index versions built longer ago than this
  are deleted, whatever ``AFTERWRITE_INDEX_KEEP_VERSIONS`` says, never the published one, under
  the collection's build lock, through the same prune a rebuild uses;
- ``AFTERWRITE_ERASURE_LOG_RETENTION_DAYS`` (1095): erasure log rows;
- ``AFTERWRITE_ERASURE_TOMBSTONE_DAYS`` (30): erasure tombstones in Redis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from afterwrite.core import erasure
from afterwrite.core.settings import Settings
from afterwrite.vectorindex import files
from afterwrite.worker.index import publish
from afterwrite.worker.index.lock import BUILD, LockBusy, collection_lock

log = logging.getLogger("afterwrite.retention")

_PURGE_CACHE = """
DELETE FROM embedding_cache WHERE (model, content_hash) IN (
    SELECT c.model, c.content_hash FROM embedding_cache c
    WHERE c.created_at < %s AND NOT EXISTS (
        SELECT 1 FROM embeddings e
        WHERE e.content_hash = c.content_hash AND e.model = c.model AND NOT e.deleted)
    ORDER BY c.created_at LIMIT %s)
"""


@dataclass(frozen=True)
class StoreReport:
    store: str
    deleted: int
    finished: bool
    duration_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "*",
            "table": self.store,
            "deleted": self.deleted,
            "finished": self.finished,
            "duration_s": round(self.duration_s, 3),
        }


def purge_embedding_cache(
    conn: psycopg.Connection[Any],
    cut: datetime,
    *,
    chunk_rows: int,
    budget_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> StoreReport:
    """Delete cache entries created before ``cut`` that no live embedding uses, in chunks
    within ``budget_s``. ``conn`` must be in autocommit mode. Idempotent."""
    started = clock()
    deleted = 0
    finished = False
    while clock() - started < budget_s:
        with conn.transaction():
            n = max(conn.execute(_PURGE_CACHE, (cut, chunk_rows)).rowcount, 0)
        deleted += n
        if n < chunk_rows:
            finished = True
            break
    if deleted:
        log.info(
            "retention embedding cache deleted=%d",
            deleted,
            extra={"action": "retention", "table": "embedding_cache", "deleted": deleted},
        )
    return StoreReport("embedding_cache", deleted, finished, clock() - started)


def old_versions(directory: Path, cut_epoch_s: float) -> int:
    """How many of the oldest versions in ``directory`` were built before ``cut_epoch_s``
    (counted from the oldest; the published one is never among those pruned)."""
    count = 0
    for version in files.versions_on_disk(directory):
        try:
            manifest = files.read_manifest(directory, files.version_manifest_file(version))
        except files.IndexFileError:
            manifest = None
        built = float(manifest.get("built_at", 0)) if manifest else 0.0
        if built >= cut_epoch_s:
            break
        count += 1
    return count


def prune_old_index_versions(
    settings: Settings, days: int, *, now_s: float | None = None
) -> StoreReport:
    """Delete every collection's index versions built more than ``days`` ago (never the
    published one), each under its collection's build lock; a collection being built is left
    for the next run."""
    started = time.monotonic()
    cut = (time.time() if now_s is None else now_s) - days * 86_400
    root = settings.index_path
    deleted = 0
    finished = True
    collections = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for collection in collections:
        directory = root / collection
        if not old_versions(directory, cut):
            continue
        try:
            with collection_lock(settings.require_database_url(), BUILD, collection):
                versions = files.versions_on_disk(directory)
                keep = len(versions) - old_versions(directory, cut)
                deleted += len(publish.prune(directory, keep=max(keep, 0)))
        except LockBusy:
            finished = False
    if deleted:
        log.info(
            "retention index versions deleted=%d",
            deleted,
            extra={"action": "retention", "table": "index_versions", "deleted": deleted},
        )
    return StoreReport("index_versions", deleted, finished, time.monotonic() - started)


def purge_erasure_log(conn: psycopg.Connection[Any], cut: datetime) -> StoreReport:
    """Delete erasure log rows older than ``cut`` (a small table: one statement)."""
    started = time.monotonic()
    n = max(conn.execute("DELETE FROM erasure_log WHERE erased_at < %s", (cut,)).rowcount, 0)
    return StoreReport("erasure_log", n, True, time.monotonic() - started)


def purge_tombstones(r: Any, prefix: str, cut_ms: int) -> StoreReport:
    """Forget erasure tombstones older than ``cut_ms`` (epoch milliseconds)."""
    started = time.monotonic()
    key = erasure.tombstone_key(prefix)
    raw: Any = r.hgetall(key)
    old = [k for k, v in raw.items() if int(v) < cut_ms]
    if old:
        r.hdel(key, *old)
    return StoreReport("erasure_tombstones", len(old), True, time.monotonic() - started)


def run_store_retention(
    conn: psycopg.Connection[Any], settings: Settings, r: Any | None = None
) -> list[StoreReport]:
    """The retention of the embedding cache, index versions, the erasure log and (with a
    Redis connection ``r``) the erasure tombstones; see the module doc."""
    now = datetime.now(UTC)
    reports = [
        purge_embedding_cache(
            conn,
            now - timedelta(days=settings.embedding_cache_retention_days),
            chunk_rows=settings.retention_chunk_rows,
            budget_s=settings.retention_budget_s,
        ),
        prune_old_index_versions(settings, settings.index_version_retention_days),
        purge_erasure_log(conn, now - timedelta(days=settings.erasure_log_retention_days)),
    ]
    if r is not None:
        cut_ms = int((now - timedelta(days=settings.erasure_tombstone_days)).timestamp() * 1000)
        reports.append(purge_tombstones(r, settings.stream_prefix, cut_ms))
    return reports
