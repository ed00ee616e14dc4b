"""Freshness between rebuilds: the changes since a build, published for readers in seconds.

``v<version>.delta`` beside the version's files holds every row of the collection with ``seq``
above the published build's ``max_seq``: their ids are *masked* in the built index (a deleted
document disappears, a changed one loses its old vector), and the live ones of the index's model
are searched exactly next to it and merged. A document therefore appears at most once. The delta
is recomputed whole (it is small: the changes of one rebuild interval) and names the version it
applies to; a reader ignores a delta of another version.

The manifest binds the delta: each published delta's sha256 is written into ``manifest.json``
(``delta_sha256``) right after the delta file, and a reader serves a delta only when its bytes
hash to that value. A ``.delta`` file that someone else put there is never served. Every
writer of ``manifest.json`` holds the collection's delta lock, so binding a delta (read the
manifest, add the hash, replace it) cannot lose another writer's manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from afterwrite.vectorindex import files
from afterwrite.worker.index import documents, source


@dataclass(frozen=True)
class DeltaResult:
    published: bool
    why: str
    base_version: int | None = None
    vectors: int = 0
    masked: int = 0
    max_seq: int | None = None
    key: tuple[int, ...] | None = None
    elapsed_s: float = 0.0
    sha256: str | None = None
    """Of the delta file written (``published``), for the manifest's ``delta_sha256``."""


def current_key(directory: Path, manifest: dict[str, Any]) -> tuple[int, ...] | None:
    """``(base_version, *source_key)`` of the delta ``manifest`` binds, or None (none bound,
    or the file on disk is not the one bound)."""
    try:
        raw = (directory / files.delta_file(int(manifest["version"]))).read_bytes()
        delta = files.bound_delta(raw, manifest)
    except (FileNotFoundError, files.IndexFileError):
        return None
    if delta is None:
        return None
    return (delta.base_version, *delta.source_key)


def bind(directory: Path, version: int, sha256: str) -> bool:
    """Record ``sha256`` as the delta of ``manifest.json`` if it still publishes ``version``
    (the caller holds the delta lock). False when another version is published now."""
    manifest = files.read_manifest(directory)
    if manifest is None or int(manifest.get("version", -1)) != version:
        return False
    files.write_json_atomic(directory / files.MANIFEST, {**manifest, "delta_sha256": sha256})
    return True


def refresh(
    conn: psycopg.Connection[Any],
    directory: Path,
    collection: str,
    manifest: dict[str, Any],
    *,
    force: bool = False,
    bind_manifest: bool = True,
) -> DeltaResult:
    """Publish the delta of ``manifest``'s version when the changes since its build moved
    (or ``force``), and bind it in ``manifest.json`` (unless ``bind_manifest`` is False: a
    build about to publish ``manifest`` puts ``DeltaResult.sha256`` in it itself). Hold the
    collection's delta lock. Reads in one REPEATABLE READ snapshot."""
    t0 = time.perf_counter()
    version = int(manifest["version"])
    since = int(manifest["max_seq"])
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        key = source.changed_key(conn, collection, since)
        have = current_key(directory, manifest)
        if not force and have is not None and have == (version, *key):
            return DeltaResult(False, "unchanged", version, key=key)
        if not force and have is None and key[0] == 0:
            return DeltaResult(False, "no changes since the build", version, key=key)
        changed = source.read_changed(conn, collection, since, manifest["model"], manifest["dim"])
        docs = documents.read_changed_documents(
            conn,
            changed.ids,
            # the caps the version was built with (one version, one rule for its documents)
            text_max_bytes=int(manifest.get("text_max_bytes", 0)),
            metadata_max_bytes=int(manifest.get("metadata_max_bytes", 0)),
        )
    delta = files.Delta(
        base_version=version,
        max_seq=changed.max_seq,
        model=str(manifest["model"]),
        dim=int(manifest["dim"]),
        ids=changed.ids,
        vectors=changed.vectors,
        doc_ids=changed.doc_ids,
        masked=changed.masked,
        built_at=time.time(),
        source_key=key,
        documents=docs,
    )
    sha = files.write_atomic(directory / files.delta_file(version), files.encode_delta(delta))
    if bind_manifest:
        bind(directory, version, sha)
    return DeltaResult(
        True,
        "published",
        version,
        vectors=len(changed.doc_ids),
        masked=len(changed.masked),
        max_seq=changed.max_seq,
        key=key,
        elapsed_s=time.perf_counter() - t0,
        sha256=sha,
    )
