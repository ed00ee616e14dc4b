"""Freshness between rebuilds: the changes since a build, published for readers in seconds.

``v<version>.delta`` beside the version's files holds every row of the collection with ``seq``
above the published build's ``max_seq``: their ids are *masked* in the built index (a deleted
document disappears, a changed one loses its old vector), and the live ones of the index's model
are searched exactly next to it and merged. A document therefore appears at most once. The delta
is recomputed whole (it is small: the changes of one rebuild interval) and names the version it
applies to; a reader ignores a delta of another version.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from afterwrite.vectorindex import files
from afterwrite.worker.index import source


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


def current_key(directory: Path, version: int) -> tuple[int, ...] | None:
    """``(base_version, *source_key)`` of ``version``'s published delta, or None."""
    try:
        raw = (directory / files.delta_file(version)).read_bytes()
        delta = files.decode_delta(raw)
    except (FileNotFoundError, files.IndexFileError):
        return None
    return (delta.base_version, *delta.source_key)


def refresh(
    conn: psycopg.Connection[Any],
    directory: Path,
    collection: str,
    manifest: dict[str, Any],
    *,
    force: bool = False,
) -> DeltaResult:
    """Publish the delta of ``manifest``'s version when the changes since its build moved
    (or ``force``). Hold the collection's delta lock. Reads in one REPEATABLE READ snapshot."""
    t0 = time.perf_counter()
    version = int(manifest["version"])
    since = int(manifest["max_seq"])
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        key = source.changed_key(conn, collection, since)
        have = current_key(directory, version)
        if not force and have is not None and have == (version, *key):
            return DeltaResult(False, "unchanged", version, key=key)
        if not force and have is None and key[0] == 0:
            return DeltaResult(False, "no changes since the build", version, key=key)
        changed = source.read_changed(conn, collection, since, manifest["model"], manifest["dim"])
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
    )
    files.write_atomic(directory / files.delta_file(version), files.encode_delta(delta))
    return DeltaResult(
        True,
        "published",
        version,
        vectors=len(changed.doc_ids),
        masked=len(changed.masked),
        max_seq=changed.max_seq,
        key=key,
        elapsed_s=time.perf_counter() - t0,
    )
