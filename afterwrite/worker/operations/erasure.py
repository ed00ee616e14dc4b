"""Erasing one user everywhere afterwrite keeps data: ``afterwrite erase --user-id U``.

:func:`erase_user` works through every store in an order that leaves no way back:

1. **Tombstone** (Redis hash ``<prefix>:erased``, user hash → now): drains read the hash in
   the same MULTI/EXEC as their entries, so every batch read afterwards acknowledges,
   without storing, entries naming the user that were
   recorded before now (pending entries, reclaimed ones after a worker restart, spilled ones
   replayed later). A record made after the erasure is stored normally.
2. **Rows**: ``query_history`` (``user_id``), ``metric_points`` and ``metric_rollups`` whose
   tags name the user, stored ``embedding_jobs`` whose metadata does, and dead letters that
   mention the user (decoded payload, or the id in the raw bytes).
3. **Embeddings** whose metadata names the user become tombstones (vector, text and metadata
   cleared; freshness deltas hide them at once), and their cache entries are deleted when no
   other live document uses them.
4. **Indexes** of the collections touched: rebuilt without those documents, then every
   other version (and its delta) pruned, so neither a reader nor ``index rollback`` can serve
   them again.
5. **Batches in flight** when the tombstone was written (read before it) may still commit:
   the erasure waits until the entries pending then are acknowledged or idle (at most
   ``AFTERWRITE_BATCH_TIMEOUT_S``), and deletes the rows again.
6. **Spill journals** under this host's ``AFTERWRITE_SPILL_DIR`` lose the user's entries
   (other hosts: see the README; the tombstone covers their replays).
7. **Erasure log**: one row with the counts per store and the user id's sha256, never data.

Idempotent: a second run finds nothing and records zeros. ``dry_run`` counts and changes
nothing (no tombstone, no log row).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg.types.json import Jsonb

from afterwrite.core import erasure, kinds, wire
from afterwrite.core.errors import ConfigurationError, TransientError
from afterwrite.core.settings import Settings, load_settings
from afterwrite.spill.erase import erase_entries
from afterwrite.vectorindex import files
from afterwrite.worker.index import jobs, publish
from afterwrite.worker.index.lock import BUILD, collection_lock
from afterwrite.worker.ingest.streams import is_missing_group

log = logging.getLogger("afterwrite.erasure")

_NAMES_USER = "(tags->>'user_id' = %(u)s OR tags->>'user' = %(u)s)"
_META_NAMES_USER = "(metadata->>'user_id' = %(u)s OR metadata->>'user' = %(u)s)"
_DEAD_MENTION = (
    "(payload->>'user_id' = %(u)s OR payload->'tags'->>'user_id' = %(u)s"
    " OR payload->'tags'->>'user' = %(u)s OR payload->'metadata'->>'user_id' = %(u)s"
    " OR payload->'metadata'->>'user' = %(u)s"
    # not decoded (undecodable, capped, or its redaction failed): the id in its bytes
    " OR ((payload IS NULL OR payload ? 'afterwrite_truncated')"
    "     AND position(convert_to(%(u)s, 'UTF8') IN payload_raw) > 0))"
)
ROW_STORES: dict[str, tuple[str, str]] = {
    # store name → (table, condition naming the user)
    "query_history": ("query_history", "user_id = %(u)s"),
    "metric_points": ("metric_points", _NAMES_USER),
    "metric_rollups": ("metric_rollups", _NAMES_USER),
    "embedding_jobs": ("embedding_jobs", _META_NAMES_USER),
    "dead_letters": ("dead_letters", _DEAD_MENTION),
}


INDEX_WAIT_S = 120.0
"""How long an erasure waits for a collection's running build before giving up (re-run it)."""


class ErasureError(ConfigurationError, ValueError):
    """An erasure that cannot start (an empty user id)."""


class IndexBusyError(TransientError, RuntimeError):
    """A collection's index could not be rebuilt in time; the erasure is safe to re-run."""


@dataclass
class ErasureReport:
    user_hash: str
    dry_run: bool
    counts: dict[str, int] = field(default_factory=dict)
    collections: list[str] = field(default_factory=list)
    """Collections whose index was rebuilt without the user's documents."""
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "user_hash": self.user_hash,
            "dry_run": self.dry_run,
            "counts": self.counts,
            "collections": self.collections,
            "duration_s": round(self.duration_s, 3),
        }


def erase_user(
    user_id: str,
    *,
    settings: Settings | None = None,
    dry_run: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> ErasureReport:
    """Erase (or, ``dry_run``, count) ``user_id``'s data in every store; see the module doc.
    ``settings`` default to the environment's. Blocks for the index rebuilds (seconds per
    collection touched). Idempotent and safe to re-run. Also ``afterwrite.erase_user``."""
    if not isinstance(user_id, str) or not user_id:
        raise ErasureError("a user id is required")
    if settings is None:
        settings = load_settings()
    started = clock()
    report = ErasureReport(erasure.user_hash(user_id), dry_run)
    r = redis.Redis.from_url(settings.require_redis_url(), socket_timeout=30)
    try:
        with psycopg.connect(settings.require_database_url(), autocommit=True) as conn:
            pending_then = _streams(settings, r, user_id, report, dry_run=dry_run)
            _rows(conn, user_id, report, dry_run=dry_run)
            hashes = _embeddings(conn, user_id, report, dry_run=dry_run)
            if not dry_run:
                _settle(settings, r, pending_then, clock)
                again = _rows(conn, user_id, ErasureReport("", False), dry_run=False)
                for store, n in again.counts.items():
                    report.counts[store] += n
                _cache(conn, hashes, report)
                _indexes(settings, report, clock)
            spill = erase_entries(
                settings.spill_path,
                lambda _kind, entry: user_id in erasure.users_named(_decode(entry)),
                dry_run=dry_run,
            )
            report.counts["spill_entries"] = spill.removed
            report.counts["spill_segments_busy"] = spill.busy_segments
            report.duration_s = clock() - started
            if not dry_run:
                _log(conn, report)
    finally:
        r.close()
    log.info(
        "erased user %s…: %s",
        report.user_hash[:12],
        report.counts,
        extra={"action": "erase", **report.as_dict()},
    )
    return report


def _decode(entry: bytes) -> Any:
    try:
        return wire.decode(entry)
    except Exception:
        return None


def _streams(
    settings: Settings, r: redis.Redis, user_id: str, report: ErasureReport, *, dry_run: bool
) -> dict[str, list[bytes]]:
    """Write the tombstone; count the user's entries in every stream; return the ids
    pending (read by a batch not yet committed) at that moment, per stream."""
    if not dry_run:
        r.hset(
            erasure.tombstone_key(settings.stream_prefix), report.user_hash, int(time.time() * 1000)
        )
    found = 0
    pending: dict[str, list[bytes]] = {}
    for kind in kinds.names():
        key = wire.stream_key(settings.stream_prefix, kind)
        last = "-"
        while True:
            batch: Any = r.xrange(key, last, "+", count=10_000)
            if not batch:
                break
            for _, fields in batch:
                payload = fields.get(wire.PAYLOAD_FIELD)
                if payload is not None and user_id in erasure.users_named(_decode(payload)):
                    found += 1
            if len(batch) < 10_000:
                break
            last = "(" + batch[-1][0].decode()
        try:
            rows: Any = r.xpending_range(key, settings.consumer_group, "-", "+", 10_000)
        except redis.ResponseError as exc:
            if not is_missing_group(exc):
                raise
            rows = []
        pending[key] = [
            row["message_id"]
            for row in rows
            if int(row["time_since_delivered"]) < settings.batch_timeout_s * 1000
        ]
    report.counts["stream_entries"] = found
    return pending


def _settle(
    settings: Settings,
    r: redis.Redis,
    pending_then: dict[str, list[bytes]],
    clock: Callable[[], float],
) -> None:
    """Wait until the entries that were being processed when the tombstone was written are
    acknowledged (their batch committed) or have been idle for a batch timeout (their
    consumer is gone; a reclaim will re-read them under the tombstone)."""
    deadline = clock() + settings.batch_timeout_s
    idle_ms = int(settings.batch_timeout_s * 1000)
    while clock() < deadline:
        busy = 0
        for key, ids in pending_then.items():
            if not ids:
                continue
            try:
                rows: Any = r.xpending_range(key, settings.consumer_group, "-", "+", 10_000)
            except redis.ResponseError:
                continue
            still = {
                row["message_id"] for row in rows if int(row["time_since_delivered"]) < idle_ms
            }
            busy += sum(1 for i in ids if i in still)
        if not busy:
            return
        time.sleep(0.1)


def _rows(
    conn: psycopg.Connection[Any], user_id: str, report: ErasureReport, *, dry_run: bool
) -> ErasureReport:
    for store, (table, condition) in ROW_STORES.items():
        verb = "SELECT count(*) FROM" if dry_run else "DELETE FROM"
        cur = conn.execute(f"{verb} {table} WHERE {condition}", {"u": user_id})
        n = int(cur.fetchone()[0]) if dry_run else max(cur.rowcount, 0)  # type: ignore[index]
        report.counts[store] = n
    return report


def _embeddings(
    conn: psycopg.Connection[Any], user_id: str, report: ErasureReport, *, dry_run: bool
) -> list[tuple[str, bytes]]:
    """Tombstone the live embeddings whose metadata names the user; their (model, hash)."""
    found = conn.execute(
        f"SELECT collection, model, content_hash FROM embeddings WHERE {_META_NAMES_USER}"
        " AND NOT deleted",
        {"u": user_id},
    ).fetchall()
    report.counts["embeddings"] = len(found)
    report.collections = sorted({row[0] for row in found})
    if not dry_run and found:
        conn.execute(
            "UPDATE embeddings SET deleted = true, vector = NULL, text = NULL, metadata = NULL,"
            " content_hash = NULL, seq = nextval('embedding_seq'), embedded_at = now()"
            f" WHERE {_META_NAMES_USER}",
            {"u": user_id},
        )
    return [(row[1], bytes(row[2])) for row in found if row[1] and row[2]]


def _cache(
    conn: psycopg.Connection[Any], hashes: list[tuple[str, bytes]], report: ErasureReport
) -> None:
    """Delete the erased documents' cache entries that no other live document uses."""
    deleted = 0
    for model, content_hash in sorted(set(hashes)):
        cur = conn.execute(
            "DELETE FROM embedding_cache c WHERE c.model = %s AND c.content_hash = %s"
            " AND NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.content_hash = c.content_hash"
            " AND e.model = c.model AND NOT e.deleted)",
            (model, content_hash),
        )
        deleted += max(cur.rowcount, 0)
    report.counts["embedding_cache"] = deleted


def _indexes(
    settings: Settings, report: ErasureReport, clock: Callable[[], float] = time.monotonic
) -> None:
    """Rebuild each touched collection, then prune every other version (and its delta). A
    build already running (the schedule's) is waited for, then built over."""
    pruned = 0
    for collection in report.collections:
        directory = publish.collection_dir(settings.index_path, collection)
        if not directory.is_dir():
            continue
        deadline = clock() + INDEX_WAIT_S
        while True:
            result = jobs.rebuild(settings, collection, force=True)
            empty = result.get("why") == "no live vectors"
            if result.get("status") == "published" or empty:
                break
            if clock() > deadline:
                raise IndexBusyError(
                    f"{collection}: could not rebuild the index ({result.get('why')}); "
                    "run afterwrite erase again (it is idempotent)"
                )
            time.sleep(1.0)
        with collection_lock(settings.require_database_url(), BUILD, collection, wait_s=60.0):
            if empty:
                # nothing left to build (the user's documents were all it held): no version
                # may keep serving them
                pruned += _remove_all_versions(directory)
            else:
                pruned += len(publish.prune(directory, keep=1))
    report.counts["index_versions_pruned"] = pruned


def _remove_all_versions(directory: Path) -> int:
    versions = files.versions_on_disk(directory)
    (directory / files.MANIFEST).unlink(missing_ok=True)
    return len(publish.prune(directory, keep=0)) if versions else 0


def _log(conn: psycopg.Connection[Any], report: ErasureReport) -> None:
    conn.execute(
        "INSERT INTO erasure_log (user_hash, counts, collections, host, duration_s)"
        " VALUES (%s, %s, %s, %s, %s)",
        (
            report.user_hash,
            Jsonb(report.counts),
            Jsonb(report.collections),
            socket.gethostname(),
            report.duration_s,
        ),
    )
