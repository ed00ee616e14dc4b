"""The index jobs, as plain functions for Celery tasks and beat entries to wrap.

- :func:`rebuild` one collection: lock, check, read (COPY BINARY), build, measure recall,
  publish, prune, refresh the delta. Idempotent; safe to run from several workers at once
  (only the lock holder builds; the others return ``skipped``).
- :func:`rebuild_changed`: every collection whose vectors moved since its published build.
- :func:`refresh_deltas`: publish the changes since each published build (freshness).

Every build and published delta is recorded in ``index_builds`` with its timings. Each job
returns a JSON-able dict; none raises for an ordinary outcome (busy, unchanged, mixed models,
below the recall floor): those are reported. Database or disk errors propagate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg

from afterwrite.core.collections import check_collection
from afterwrite.core.settings import Settings
from afterwrite.vectorindex import files
from afterwrite.vectorindex.build import TUNE_RECALL_TARGET, Built, build_index
from afterwrite.vectorindex.choose import Choice, choose_index
from afterwrite.vectorindex.documents import DocumentsBuilder
from afterwrite.worker.index import delta as deltas
from afterwrite.worker.index import documents, owner, publish, source
from afterwrite.worker.index.lock import BUILD, DELTA, LockBusy, collection_lock

log = logging.getLogger("afterwrite.index")

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)`` with stage ``read`` / ``build`` / ``check`` / ``write``."""


def _now() -> datetime:
    return datetime.now(UTC)


def record_build(conn: psycopg.Connection[Any], row: dict[str, Any]) -> None:
    """Insert one ``index_builds`` row (autocommit connection)."""
    cols = (
        "collection", "version", "kind", "status", "vector_count", "max_seq", "model", "dim",
        "index_type", "read_s", "build_s", "write_s", "recall_at_10", "detail", "started_at",
        "finished_at",
    )  # fmt: skip
    conn.execute(
        f"INSERT INTO index_builds ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})",
        [row.get(c) for c in cols],
    )


def _skip(
    conn: psycopg.Connection[Any] | None,
    collection: str,
    why: str,
    started: datetime,
    *,
    status: str = "skipped",
    record: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    report = {"collection": collection, "skipped": True, "status": status, "why": why, **extra}
    if conn is not None and record:
        record_build(
            conn,
            {
                "collection": collection,
                "kind": "build",
                "status": status,
                "detail": why,
                "started_at": started,
                "finished_at": _now(),
                **{k: v for k, v in extra.items() if k in {"model", "dim", "vector_count"}},
            },
        )
    level = logging.WARNING if status != "skipped" else logging.INFO
    log.log(
        level,
        "index %s not built: %s",
        collection,
        why,
        extra={"action": f"index_{status}", "collection": collection},
    )
    return report


def rebuild(
    settings: Settings,
    collection: str,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build and publish ``collection``'s index when it changed since the published build
    (always with ``force``). Returns a report: ``skipped`` + ``why``, or ``version``,
    ``vector_count``, ``index_type``, ``recall_at_10``, ``timings``. Blocks for the build."""
    check_collection(collection)
    url = settings.require_database_url()
    directory = publish.collection_dir(settings.index_path, collection)
    started = _now()
    try:
        with collection_lock(url, BUILD, collection) as conn:
            owner.claim(settings, conn.info.dbname)
            directory.mkdir(parents=True, exist_ok=True)
            return _rebuild_locked(settings, conn, directory, collection, force, progress, started)
    except LockBusy as exc:
        return _skip(None, collection, str(exc), started, record=False)


def _rebuild_locked(
    settings: Settings,
    conn: psycopg.Connection[Any],
    directory: Path,
    collection: str,
    force: bool,
    progress: Progress | None,
    started: datetime,
) -> dict[str, Any]:
    files.remove_temporaries(directory)
    try:
        current = files.read_manifest(directory)
    except files.IndexFileError:
        current = None  # a damaged manifest is replaced by this build
    model = settings.collection_model(collection)
    checked = _precheck(conn, collection, model, current, force, started)
    if isinstance(checked, dict):
        return checked
    dim = checked

    # --- read -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    watermark, complete = source.seq_watermark(conn)
    data, docs, documents_s = _read(settings, conn, collection, model, dim, progress)
    read_s = time.perf_counter() - t0
    n = len(data)
    if n == 0:
        return _skip(conn, collection, "no live vectors", started)

    # --- build ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    choice = choose_index(
        n,
        dim,
        exact_max_vectors=settings.index_exact_max_vectors,
        memory_budget_mb=settings.index_memory_budget_mb,
        override=settings.index_factory.get(collection),
    )
    built, quantizer_from, retrained = _build(
        settings, collection, choice, data, directory, current, model, progress
    )
    build_s = time.perf_counter() - t0
    base = {
        "collection": collection,
        "vector_count": n,
        "model": model,
        "dim": dim,
        "index_type": built.factory,
        "max_seq": watermark,
        "recall_at_10": built.recall_at_10,
        "read_s": read_s,
        "build_s": build_s,
    }
    recall_at_10 = built.recall_at_10
    if recall_at_10 is not None and recall_at_10 < settings.index_recall_floor:
        why = f"recall@10 {recall_at_10:.3f} below the floor {settings.index_recall_floor}"
        record_build(
            conn,
            {**base, "kind": "build", "status": "rejected", "detail": why,
             "started_at": started, "finished_at": _now()},
        )  # fmt: skip
        log.warning(why, extra={"action": "index_rejected", "collection": collection})
        return {**base, "skipped": True, "status": "rejected", "why": why}

    # --- write ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    version = next_version(conn, directory, collection)
    write_progress = None if progress is None else (lambda d, t: progress("write", d, t))
    sha, docs_sha, meta_sha, size = publish.write_version(
        directory, version, built.index, data.ids, data.doc_ids, model=model,
        documents=docs, progress=write_progress,
    )  # fmt: skip
    del docs
    manifest: dict[str, Any] = {
        "collection": collection,
        "version": version,
        "vector_count": n,
        "model": model,
        "dim": dim,
        "index_type": built.factory,
        "metric": "ip",
        "sha256": sha,
        "file": files.index_file(version),
        "file_bytes": size,
        "docs_file": files.docs_file(version),
        "docs_sha256": docs_sha,
        "meta_file": files.meta_file(version),
        "meta_sha256": meta_sha,
        "text_max_bytes": settings.index_text_max_bytes,
        "metadata_max_bytes": settings.index_metadata_max_bytes,
        "built_at": time.time(),
        "max_seq": watermark,
        "recall_at_10": recall_at_10,
        "search_params": built.params,
        "choice": choice.reason,
        "quantizer_from": quantizer_from,
        "pinned": False,
        "timings": {"read_s": read_s, "build_s": build_s, "write_s": 0.0},
    }
    manifest["timings"]["write_s"] = time.perf_counter() - t0
    # The new version's delta is written before the manifest names it, under the delta lock:
    # a reader switching versions finds its freshness data ready, and a concurrent
    # refresh_deltas never writes a delta for a version that is no longer published.
    with collection_lock(
        settings.require_database_url(), DELTA, collection, wait_s=60.0
    ) as delta_conn:
        delta_started = _now()
        fresh = deltas.refresh(
            delta_conn, directory, collection, manifest, force=True, bind_manifest=False
        )
        manifest["delta_sha256"] = fresh.sha256
        publish.publish_manifest(directory, manifest)
    write_s = time.perf_counter() - t0
    manifest["timings"]["write_s"] = write_s
    record_build(
        conn,
        {**base, "version": version, "kind": "build", "status": "published",
         "write_s": write_s, "detail": None if complete else "watermark wait timed out",
         "started_at": started, "finished_at": _now()},
    )  # fmt: skip
    _record_delta(conn, collection, manifest, fresh, delta_started)
    pruned = publish.prune(directory, settings.index_keep_versions)
    delta = {"vectors": fresh.vectors, "masked": fresh.masked, "max_seq": fresh.max_seq}
    log.info(
        "index %s v%d published: %d vectors, %s, recall@10 %s",
        collection,
        version,
        n,
        built.factory,
        recall_at_10,
        extra={"action": "index_published", "collection": collection},
    )
    return {
        "collection": collection,
        "skipped": False,
        "status": "published",
        "version": version,
        "vector_count": n,
        "model": model,
        "dim": dim,
        "index_type": built.factory,
        "choice": choice.reason,
        "quantizer_from": quantizer_from,
        "retrained": retrained,
        "recall_at_10": recall_at_10,
        "search_params": built.params,
        "max_seq": watermark,
        "watermark_complete": complete,
        "timings": {
            "read_s": read_s,
            "documents_s": documents_s,
            "build_s": build_s,
            "train_s": built.train_s,
            "add_s": built.add_s,
            "tune_s": built.tune_s,
            "write_s": write_s,
        },
        "file_bytes": size,
        "pruned": pruned,
        "delta": delta,
    }


def _build(
    settings: Settings,
    collection: str,
    choice: Choice,
    data: source.Vectors,
    directory: Path,
    current: dict[str, Any] | None,
    model: str,
    progress: Progress | None,
) -> tuple[Built, int | None, str | None]:
    """The index over ``data``, the version whose quantizer it reuses (None: trained), and
    why a reused quantizer was given up for a trained one (None: it was not)."""
    target = max(settings.index_recall_floor, TUNE_RECALL_TARGET)
    n, dim = data.vectors.shape
    centroids, quantizer_from = _prior_quantizer(directory, current, model, dim, n, choice)
    built = build_index(
        choice, data.ids, data.vectors, recall_target=target, progress=progress,
        centroids=centroids,
    )  # fmt: skip
    if not built.reused_quantizer:
        return built, None, None
    retrained = _reuse_rejected(built, current, settings.index_recall_floor)
    if retrained is None:
        return built, quantizer_from, None
    log.info(
        "index %s: retraining (%s)", collection, retrained,
        extra={"action": "index_retrain", "collection": collection},
    )  # fmt: skip
    built = build_index(choice, data.ids, data.vectors, recall_target=target, progress=progress)
    return built, None, retrained


REUSE_COUNT_RATIO = 2.0
"""A version reuses the published version's coarse quantizer while its vector count is
within this factor of that version's (beyond, the clusters were fitted to other data)."""


def _prior_quantizer(
    directory: Path,
    current: dict[str, Any] | None,
    model: str,
    dim: int,
    n: int,
    choice: Choice,
) -> tuple[npt.NDArray[np.float32] | None, int | None]:
    """The published version's IVF centroids and its version number, when this build may
    start from them instead of training (~5 s of a 1M x 384 build): the same model, dimension
    and index factory, and a vector count within :data:`REUSE_COUNT_RATIO` of its own.
    Otherwise ``(None, None)``: train."""
    if current is None or not choice.is_ivf:
        return None, None
    try:
        prior_n = int(current["vector_count"])
        same = (
            current.get("model") == model
            and int(current["dim"]) == dim
            and current.get("index_type") == choice.factory
        )
        path = directory / str(current["file"])
        version = int(current["version"])
    except (KeyError, TypeError, ValueError):
        return None, None
    if not same or not prior_n or not 1 / REUSE_COUNT_RATIO < n / prior_n < REUSE_COUNT_RATIO:
        return None, None
    if "/" in path.name or path.name.startswith(".") or not path.is_file():
        return None, None
    centroids = files.quantizer_centroids(path)
    return (centroids, version) if centroids is not None else (None, None)


def _reuse_rejected(
    built: Built, current: dict[str, Any] | None, recall_floor: float
) -> str | None:
    """Why an index built on a reused quantizer is not kept (None: kept): its recall is below
    the floor, or reaching the recall target took more than twice the published version's
    ``nprobe`` (the clusters no longer fit the data: searches would get slower)."""
    if built.recall_at_10 is not None and built.recall_at_10 < recall_floor:
        return f"recall@10 {built.recall_at_10:.3f} below {recall_floor} with the reused quantizer"
    prior = (current or {}).get("search_params") or {}
    nprobe, before = built.params.get("nprobe"), prior.get("nprobe")
    if isinstance(nprobe, int) and isinstance(before, int) and nprobe > 2 * before:
        return f"nprobe {nprobe} with the reused quantizer, {before} before"
    return None


def _read(
    settings: Settings,
    conn: psycopg.Connection[Any],
    collection: str,
    model: str,
    dim: int,
    progress: Progress | None,
) -> tuple[source.Vectors, DocumentsBuilder, float]:
    """The vectors and their documents, in one REPEATABLE READ snapshot, and the seconds
    the documents took (part of the read). The documents come first and bring the doc ids
    (no scan and sort of their own); the vectors must then be exactly those rows. (Reading
    the documents on a second connection in the same snapshot, in a thread, was measured
    slower on 2 cores: both halves are Python-bound and fought over the GIL.)"""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        source.scan_in_heap_order(conn)
        t0 = time.perf_counter()
        docs, doc_ids = documents.read_documents(
            conn, collection, model, dim,
            text_max_bytes=settings.index_text_max_bytes,
            metadata_max_bytes=settings.index_metadata_max_bytes,
        )  # fmt: skip
        documents_s = time.perf_counter() - t0
        data = source.read_vectors(conn, collection, model, dim, progress=progress, doc_ids=doc_ids)
    return data, docs, documents_s


def _precheck(
    conn: psycopg.Connection[Any],
    collection: str,
    model: str,
    current: dict[str, Any] | None,
    force: bool,
    started: datetime,
) -> dict[str, Any] | int:
    """The dimension to build, or the report of why not to build now."""
    if current is not None and current.get("pinned") and not force:
        return _skip(
            None, collection, f"pinned to v{current['version']} by a rollback", started,
            record=False,
        )  # fmt: skip
    models = source.live_models(conn, collection)
    others = [m for m in models if m.model != model]
    if others:
        what = ", ".join(f"{m.rows:,} rows of {m.model!r}" for m in others)
        return _skip(
            conn, collection, f"re-embedding in progress ({what}; configured {model!r})", started
        )
    mine = [m for m in models if m.model == model]
    if not mine or mine[0].rows == 0:
        return _skip(conn, collection, "no live vectors", started, record=current is not None)
    if len(mine[0].dims) != 1:
        return _skip(conn, collection, f"{model!r} rows have dimensions {mine[0].dims}", started)
    dim = mine[0].dims[0]
    if (
        not force
        and current is not None
        and current.get("model") == model
        and source.max_seq(conn, collection) <= int(current.get("max_seq", -1))
    ):
        return _skip(None, collection, "unchanged since the published build", started, record=False)
    return dim


def next_version(conn: psycopg.Connection[Any], directory: Path, collection: str) -> int:
    """Above every version on disk, published, or recorded (pruned files leave no trace on
    disk, and a reused number would confuse readers that still hold it)."""
    row = conn.execute(
        "SELECT coalesce(max(version), 0) FROM index_builds WHERE collection = %s",
        (collection,),
    ).fetchone()
    recorded = int(row[0]) if row else 0
    return publish.next_version(directory, at_least=recorded + 1)


def collections(settings: Settings) -> list[str]:
    """Collections with rows in ``embeddings`` or a published index."""
    with psycopg.connect(settings.require_database_url(), autocommit=True) as conn:
        names = set(source.collections_with_vectors(conn))
    root = Path(settings.index_path)
    if root.is_dir():
        names |= {p.name for p in root.iterdir() if (p / files.MANIFEST).is_file()}
    valid = []
    for name in sorted(names):
        try:
            valid.append(check_collection(name))
        except ValueError:
            continue
    return valid


def rebuild_changed(settings: Settings) -> list[dict[str, Any]]:
    """Rebuild every collection whose ``max(seq)`` moved past its published build's (or that
    has none). Collections pinned by a rollback are left alone. For the beat schedule
    (every ``index_rebuild_interval_s``)."""
    out = []
    for collection in collections(settings):
        directory = publish.collection_dir(settings.index_path, collection)
        try:
            manifest = files.read_manifest(directory)
        except files.IndexFileError:
            manifest = None
        if manifest is not None:
            if manifest.get("pinned"):
                continue
            with psycopg.connect(settings.require_database_url(), autocommit=True) as conn:
                moved = source.max_seq(conn, collection) > int(manifest.get("max_seq", -1))
            model_changed = manifest.get("model") != settings.collection_model(collection)
            if not moved and not model_changed:
                continue
        out.append(rebuild(settings, collection))
    return out


def _refresh_one(
    settings: Settings,
    collection: str,
    directory: Path,
    *,
    wait_s: float = 0.0,
    force: bool = False,
) -> dict[str, Any]:
    started = _now()
    url = settings.require_database_url()
    try:
        with collection_lock(url, DELTA, collection, wait_s=wait_s) as conn:
            owner.claim(settings, conn.info.dbname)
            manifest = files.read_manifest(directory)
            if manifest is None:
                return {"collection": collection, "published": False, "why": "no index"}
            result = deltas.refresh(conn, directory, collection, manifest, force=force)
            _record_delta(conn, collection, manifest, result, started)
    except LockBusy as exc:
        return {"collection": collection, "published": False, "why": str(exc)}
    except files.IndexFileError as exc:
        return {"collection": collection, "published": False, "why": f"manifest: {exc}"}
    return {
        "collection": collection,
        "published": result.published,
        "why": result.why,
        "version": result.base_version,
        "vectors": result.vectors,
        "masked": result.masked,
        "max_seq": result.max_seq,
    }


def _record_delta(
    conn: psycopg.Connection[Any],
    collection: str,
    manifest: dict[str, Any],
    result: deltas.DeltaResult,
    started: datetime,
) -> None:
    if not result.published:
        return
    record_build(
        conn,
        {
            "collection": collection,
            "version": result.base_version,
            "kind": "delta",
            "status": "published",
            "vector_count": result.vectors,
            "max_seq": result.max_seq,
            "model": manifest.get("model"),
            "dim": manifest.get("dim"),
            "index_type": "delta",
            "write_s": result.elapsed_s,
            "detail": f"{result.masked} masked",
            "started_at": started,
            "finished_at": _now(),
        },
    )


def refresh_deltas(settings: Settings) -> list[dict[str, Any]]:
    """For every published collection, publish the changes since its build when they moved.
    Cheap when nothing changed (one indexed count per collection). For the beat schedule
    (every ``index_refresh_interval_s``)."""
    root = Path(settings.index_path)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.iterdir()):
        if not (path / files.MANIFEST).is_file():
            continue
        try:
            collection = check_collection(path.name)
        except ValueError:
            continue
        out.append(_refresh_one(settings, collection, path))
    return out


def status(settings: Settings, collection: str | None = None) -> list[dict[str, Any]]:
    """Per collection: the published manifest, kept versions, delta, and the last builds."""
    names = [check_collection(collection)] if collection else collections(settings)
    out = []
    with psycopg.connect(settings.require_database_url(), autocommit=True) as conn:
        for name in names:
            directory = publish.collection_dir(settings.index_path, name)
            try:
                manifest = files.read_manifest(directory)
                error = None
            except files.IndexFileError as exc:
                manifest, error = None, str(exc)
            rows = conn.execute(
                "SELECT version, kind, status, vector_count, index_type, read_s, build_s,"
                " write_s, recall_at_10, detail, finished_at FROM index_builds"
                " WHERE collection = %s AND kind = 'build' ORDER BY id DESC LIMIT 5",
                (name,),
            ).fetchall()
            keys = ("version", "kind", "status", "vector_count", "index_type", "read_s",
                    "build_s", "write_s", "recall_at_10", "detail", "finished_at")  # fmt: skip
            out.append(
                {
                    "collection": name,
                    "manifest": manifest,
                    "manifest_error": error,
                    "versions": files.versions_on_disk(directory),
                    "delta": deltas.current_key(directory, manifest) if manifest else None,
                    "db_max_seq": source.max_seq(conn, name),
                    "configured_model": settings.collection_model(name),
                    "recent_builds": [
                        {**dict(zip(keys, r, strict=True)), "finished_at": r[-1].isoformat()}
                        for r in rows
                    ],
                }
            )
    return out


def rollback(settings: Settings, collection: str, to: int | None = None) -> dict[str, Any]:
    """Re-publish an earlier kept version (under the build lock, waiting up to 30 s)."""
    check_collection(collection)
    directory = publish.collection_dir(settings.index_path, collection)
    url = settings.require_database_url()
    with (
        collection_lock(url, BUILD, collection, wait_s=30.0),
        collection_lock(url, DELTA, collection, wait_s=30.0) as conn,
    ):
        owner.claim(settings, conn.info.dbname)
        result = publish.rollback(directory, collection, to)
        # The version served again gets a delta of everything since its build (its old delta
        # file is stale: deletions since then would come back). Readers see the stale one
        # only between these two atomic writes.
        manifest = files.read_manifest(directory)
        if manifest is not None:
            started = _now()
            fresh = deltas.refresh(conn, directory, collection, manifest, force=True)
            _record_delta(conn, collection, manifest, fresh, started)
        return result
