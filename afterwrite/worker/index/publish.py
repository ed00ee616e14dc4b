"""Publishing versions: write the files, then the manifest; keep the last K; roll back.

Order of a publish (each step atomic, see :mod:`afterwrite.vectorindex.files`): index file, doc map,
the version's own manifest copy, then ``manifest.json``. Until the last ``os.replace`` readers
see the previous version; a crash anywhere before it leaves that version published and
loadable, plus at most a ``.tmp-*`` file that the next builder removes. Callers hold the
collection's build lock (:mod:`afterwrite.worker.index.lock`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from afterwrite.core.collections import check_collection
from afterwrite.vectorindex import files
from afterwrite.vectorindex.documents import DocumentsBuilder
from afterwrite.vectorindex.files import IndexFileError, WriteProgress

log = logging.getLogger("afterwrite.index")


def collection_dir(index_path: Path, collection: str) -> Path:
    return Path(index_path) / check_collection(collection)


def next_version(directory: Path, *, at_least: int = 0) -> int:
    """One more than any version on disk, in the manifest, or ``at_least - 1``."""
    current = files.read_manifest(directory) if (directory / files.MANIFEST).exists() else None
    seen = [*files.versions_on_disk(directory), at_least - 1]
    if current is not None:
        seen.append(int(current.get("version", 0)))
    return max(seen) + 1


def write_version(
    directory: Path,
    version: int,
    index: faiss.Index,
    ids: npt.NDArray[np.int64],
    doc_ids: list[str],
    *,
    model: str,
    documents: DocumentsBuilder,
    progress: WriteProgress | None = None,
) -> tuple[str, str, str, int]:
    """Write the index file, the doc map and the documents of ``version``; return their
    sha256 and the index file's size. Does not publish.

    The index file is written in a thread while this one encodes and writes the other two:
    1.5 GB of it mostly waits on the disk (fsync) and on hashing, which release the GIL,
    while encoding the documents is Python (~2 s of a 1M rebuild hidden that way)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="afterwrite-index") as pool:
        index_file = pool.submit(
            files.write_index_atomic, directory / files.index_file(version), index,
            progress=progress,
        )  # fmt: skip
        docs_sha = files.write_atomic(
            directory / files.docs_file(version),
            files.encode_docs(ids, doc_ids, model=model, dim=int(index.d)),
        )
        meta_sha = files.write_atomic(directory / files.meta_file(version), documents.encode())
        sha, size = index_file.result()
    return sha, docs_sha, meta_sha, size


def publish_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Make ``manifest`` the published version (its own copy first, for rollback)."""
    version = int(manifest["version"])
    files.write_json_atomic(directory / files.version_manifest_file(version), manifest)
    files.write_json_atomic(directory / files.MANIFEST, manifest)


def prune(directory: Path, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` versions, never the published one. Readers hold
    loaded versions in memory, so removing files under them is harmless."""
    current = files.read_manifest(directory)
    published = int(current["version"]) if current else None
    versions = files.versions_on_disk(directory)
    doomed = [v for v in versions[: max(0, len(versions) - keep)] if v != published]
    # a version whose manifest copy was never written (its build died or lost a race)
    doomed += [v for v in files.incomplete_versions(directory) if v != published]
    for v in doomed:
        for name in (
            files.index_file(v),
            files.docs_file(v),
            files.meta_file(v),
            files.version_manifest_file(v),
            files.delta_file(v),
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / name)
    if doomed:
        files.fsync_dir(directory)
    return doomed


def rollback(directory: Path, collection: str, to: int | None = None) -> dict[str, Any]:
    """Re-publish an earlier version (default: the newest one older than the published one),
    after verifying it loads. The result is marked ``pinned``: scheduled rebuilds leave it
    alone until a forced rebuild. Raises ValueError / IndexFileError."""
    current = files.read_manifest(directory)
    if current is None:
        raise ValueError(f"{collection}: nothing published")
    now = int(current["version"])
    versions = files.versions_on_disk(directory)
    if to is None:
        older = [v for v in versions if v < now]
        if not older:
            raise ValueError(f"{collection}: no version older than v{now} is kept")
        to = older[-1]
    if to not in versions:
        raise ValueError(f"{collection}: v{to} is not kept (kept: {versions})")
    manifest = files.read_manifest(directory, files.version_manifest_file(to))
    if manifest is None:
        raise IndexFileError(f"v{to}: its manifest copy is missing")
    files.load_version(directory, manifest, collection=collection)  # verify before publishing
    manifest = {**manifest, "pinned": True, "rolled_back_at": time.time(), "rolled_back_from": now}
    # its old delta is stale (and may be gone): none is served until the caller publishes and
    # binds a fresh one
    manifest.pop("delta_sha256", None)
    files.write_json_atomic(directory / files.MANIFEST, manifest)
    log.warning(
        "index %s rolled back from v%d to v%d",
        collection,
        now,
        to,
        extra={"action": "index_rollback", "collection": collection},
    )
    return manifest
