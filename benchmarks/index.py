"""``measure_index``: the index lifecycle measured on this machine.

For each size: synthetic clustered unit vectors are COPYed into a scratch collection of
``embeddings``; a forced rebuild reports read (COPY BINARY → numpy) / build (train, add, tune,
recall) / write (serialise, fsync, publish) times, and a second one the same with the first
version published (what scheduled rebuilds do: its coarse quantizer is reused); an
``IndexReader`` measures the reload of a new version; and search latency p50/p99 is measured
for each index type (exact, IVF, HNSW) built over the same vectors. The scratch rows, builds
and files are removed afterwards.

Also home of the synthetic data (:func:`clustered_vectors`) and of the fast binary COPY
writer (:func:`insert_vectors`) the tests use.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg

from afterwrite.core.settings import Settings
from afterwrite.worker.index.source import COPY_SIGNATURE

_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds


def clustered_vectors(
    n: int, dim: int, *, clusters: int = 100, spread: float = 0.35, seed: int = 0
) -> npt.NDArray[np.float32]:
    """``n`` unit vectors around ``clusters`` random centres (like real embeddings: topical
    clumps, not uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):
        end = min(n, start + step)
        assign = rng.integers(0, clusters, end - start)
        noise = rng.standard_normal((end - start, dim)).astype(np.float32)
        noise *= spread / np.sqrt(dim)
        block = centres[assign] + noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:end] = block
    return out


def _row_dtype(coll: int, doc: int, model: int, dim: int) -> np.dtype[Any]:
    return np.dtype(
        [
            ("nf", ">i2"),
            ("l_coll", ">i4"),
            ("coll", f"S{coll}"),
            ("l_doc", ">i4"),
            ("doc", f"S{doc}"),
            ("l_job", ">i4"),
            ("job", "S16"),
            ("l_model", ">i4"),
            ("model", f"S{model}"),
            ("l_dim", ">i4"),
            ("dim", ">i4"),
            ("l_vec", ">i4"),
            ("vec", "<f4", (dim,)),
            ("l_enq", ">i4"),
            ("enq", ">i8"),
            ("l_com", ">i4"),
            ("com", ">i8"),
        ]
    )


def insert_vectors(
    conn: psycopg.Connection[Any],
    collection: str,
    vectors: npt.NDArray[np.float32],
    *,
    model: str,
    doc_prefix: str = "d",
    start: int = 0,
    chunk_rows: int = 50_000,
    progress: Callable[[int, int], None] | None = None,
    documents: Callable[[int], tuple[str | None, dict[str, Any] | None]] | None = None,
) -> list[str]:
    """COPY (binary, built with numpy) one ``embeddings`` row per vector; doc ids
    ``<doc_prefix><start + i, 9 digits>``; ``documents(i)`` gives row i's text and metadata.
    Returns the doc ids. Commits when ``conn`` does."""
    n, dim = vectors.shape
    coll_b = collection.encode()
    model_b = model.encode()
    doc_ids = [f"{doc_prefix}{start + i:09d}" for i in range(n)]
    doc_w = max((len(d.encode()) for d in doc_ids), default=1)
    if any(len(d.encode()) != doc_w for d in doc_ids):
        raise ValueError("doc ids must have one width (numbers below 10⁹)")
    dtype = _row_dtype(len(coll_b), doc_w, len(model_b), dim)
    now_us = int(time.time() * 1_000_000) - _PG_EPOCH_US
    cols = "collection, doc_id, job_id, model, dim, vector, enqueued_at, committed_at"
    if documents is not None:
        cols += ", text, metadata"
    with conn.cursor().copy(f"COPY embeddings ({cols}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(COPY_SIGNATURE + struct.pack(">ii", 0, 0))
        for lo in range(0, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            rows = np.zeros(hi - lo, dtype=dtype)
            rows["nf"] = 8 if documents is None else 10
            rows["l_coll"], rows["coll"] = len(coll_b), coll_b
            rows["l_doc"] = doc_w
            rows["doc"] = np.array([d.encode() for d in doc_ids[lo:hi]], dtype=f"S{doc_w}")
            rows["l_job"] = 16
            rows["job"] = np.frombuffer(
                b"".join(uuid.uuid4().bytes for _ in range(hi - lo)), dtype="S16"
            )
            rows["l_model"], rows["model"] = len(model_b), model_b
            rows["l_dim"], rows["dim"] = 4, dim
            rows["l_vec"], rows["vec"] = 4 * dim, vectors[lo:hi]
            rows["l_enq"], rows["enq"] = 8, now_us
            rows["l_com"], rows["com"] = 8, now_us
            if documents is None:
                copy.write(rows.tobytes())
            else:
                fixed = rows.tobytes()
                w = dtype.itemsize
                copy.write(
                    b"".join(
                        fixed[j * w : (j + 1) * w] + _document_fields(*documents(start + lo + j))
                        for j in range(hi - lo)
                    )
                )
            if progress is not None:
                progress(hi, n)
        copy.write(struct.pack(">h", -1))
    return doc_ids


def _document_fields(text: str | None, metadata: dict[str, Any] | None) -> bytes:
    """Binary COPY fields ``text, metadata`` (jsonb: version byte 1, then the JSON text)."""
    import json

    out = b""
    if text is None:
        out += struct.pack(">i", -1)
    else:
        raw = text.encode()
        out += struct.pack(">i", len(raw)) + raw
    if metadata is None:
        return out + struct.pack(">i", -1)
    meta = b"\x01" + json.dumps(metadata).encode()
    return out + struct.pack(">i", len(meta)) + meta


def set_documents(
    conn: psycopg.Connection[Any],
    collection: str,
    doc_ids: Sequence[str],
    texts: Sequence[str | None],
    metadatas: Sequence[Mapping[str, Any] | None],
    *,
    chunk_rows: int = 100_000,
) -> None:
    """Set the text and metadata of ``doc_ids`` (as the embedding stage stores them, without
    moving ``seq``: for rows about to be built, not changes after a build)."""
    import json

    for lo in range(0, len(doc_ids), chunk_rows):
        hi = lo + chunk_rows
        conn.execute(
            "UPDATE embeddings e SET text = u.text, metadata = u.metadata::jsonb"
            " FROM unnest(%s::text[], %s::text[], %s::text[]) AS u(doc_id, text, metadata)"
            " WHERE e.collection = %s AND e.doc_id = u.doc_id",
            (
                list(doc_ids[lo:hi]),
                list(texts[lo:hi]),
                [None if m is None else json.dumps(m) for m in metadatas[lo:hi]],
                collection,
            ),
        )


def _latency_ms(search: Callable[[npt.NDArray[np.float32]], Any], queries: Any) -> dict[str, float]:
    """Wall p50 / p99, and the CPU time of each search (this process, every thread): p50 /
    p99 of that are what a loaded machine (other processes on the same cores) does not
    inflate."""
    times = []
    cpu = []
    for q in queries:
        c0 = time.process_time()
        t0 = time.perf_counter()
        search(q)
        times.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    arr = np.asarray(times)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
        "cpu_ms_per_search": round(float(np.mean(cpu)), 3),
        "cpu_p99_ms": round(float(np.percentile(cpu, 99)), 3),
    }


FILTERS: dict[str, tuple[float, dict[str, Any]]] = {
    "50%": (0.5, {"lang": "en"}),
    "1%": (0.01, {"shard": 7}),
    "0.1%": (0.001, {"slot": "t007"}),
}
"""Filtered searches measured, with the share of documents each matches
(see :func:`bench_document`)."""


def bench_document(i: int) -> tuple[str, dict[str, Any]]:
    """Row ``i``'s text and metadata in the benchmark: ``lang`` splits 50/50, ``shard`` is one
    of 100, ``slot`` one of 1,000 (independent of the vectors' clusters)."""
    return (
        f"benchmark document {i}: a short passage of text about topic {i % 977}",
        {"lang": "en" if i % 2 else "de", "shard": i % 100, "slot": f"t{i % 1000:03d}"},
    )


def _filtered_search(reader: Any, q: Any, n: int) -> dict[str, Any]:
    """p50 / p99 of ``search(..., where=...)`` per filter, the path it takes, and a check that
    every answer has 10 matching hits."""
    from afterwrite.vectorindex.filtered import choose_path

    out: dict[str, Any] = {}
    for name, (share, where) in FILTERS.items():
        [(key, value)] = where.items()
        for hit in reader.search(q[0], 10, where=where):
            if hit.metadata[key] != value:
                raise RuntimeError(f"filter {where} returned {hit}")

        def search(v: npt.NDArray[np.float32], w: dict[str, Any] = where) -> Any:
            return reader.search(v, 10, where=w)

        out[name] = {**_latency_ms(search, q), "path": choose_path(int(n * share), n, 10)[0]}
    return out


def measure_index(
    sizes: tuple[int, ...] = (100_000, 1_000_000),
    dim: int = 384,
    *,
    settings: Settings | None = None,
    queries: int = 200,
    hnsw_max_vectors: int = 200_000,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Rebuild timings (read / build / write), reader load time and search latency per index
    type, for each size. Needs ``AFTERWRITE_DATABASE_URL`` (or ``settings``); writes scratch
    collections ``bench-index-<n>`` and removes them."""
    from afterwrite.core.settings import load_settings

    base = settings or load_settings()
    url = base.require_database_url()
    out: dict[str, Any] = {"dim": dim, "cpu_count": os.cpu_count(), "sizes": {}}
    for n in sizes:
        collection = f"bench-index-{n}"
        tmp = Path(tempfile.mkdtemp(prefix="afterwrite-bench-index-"))
        try:
            figures = _measure_size(
                base.model_copy(update={"index_dir": tmp}), collection, n, dim,
                queries=queries, with_hnsw=n <= hnsw_max_vectors, log=log,
            )  # fmt: skip
            out["sizes"][str(n)] = figures
            log(f"{n:,}: {figures}")
        finally:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("DELETE FROM embeddings WHERE collection = %s", (collection,))
                conn.execute("DELETE FROM index_builds WHERE collection = %s", (collection,))
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _measure_size(
    settings: Settings,
    collection: str,
    n: int,
    dim: int,
    *,
    queries: int,
    with_hnsw: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    import faiss

    from afterwrite.readers.index_reader import IndexReader
    from afterwrite.vectorindex import files
    from afterwrite.vectorindex.build import build_index, sample_queries
    from afterwrite.vectorindex.choose import Choice
    from afterwrite.worker.index import jobs

    url = settings.require_database_url()
    x = clustered_vectors(n, dim, clusters=max(100, n // 1000), seed=n)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM embeddings WHERE collection = %s", (collection,))
        conn.execute("DELETE FROM index_builds WHERE collection = %s", (collection,))
        t0 = time.perf_counter()
        with conn.transaction():
            insert_vectors(
                conn, collection, x, model=settings.collection_model(collection),
                documents=bench_document,
            )  # fmt: skip
        insert_s = time.perf_counter() - t0
    log(f"{n:,}: inserted in {insert_s:.1f}s; rebuilding")
    t0 = time.perf_counter()
    report = jobs.rebuild(settings, collection, force=True)
    total_s = time.perf_counter() - t0
    if report.get("status") != "published":
        raise RuntimeError(f"bench build not published: {report}")
    # what the schedule does from then on: rebuild with a version published (the coarse
    # quantizer is reused when the size moved < 2x)
    t0 = time.perf_counter()
    again = jobs.rebuild(settings, collection, force=True)
    again_s = time.perf_counter() - t0
    if again.get("status") != "published":
        raise RuntimeError(f"bench rebuild not published: {again}")
    t0 = time.perf_counter()
    reader = IndexReader(collection, settings.index_path, check_interval_s=3600)
    load_s = time.perf_counter() - t0
    q = sample_queries(x, queries, seed=1)
    search: dict[str, Any] = {
        f"reader {report['index_type']}": _latency_ms(lambda v: reader.search(v, 10), q)
    }
    figures: dict[str, Any] = {
        "insert_s": round(insert_s, 2),
        "rebuild_total_s": round(total_s, 2),
        "timings": {k: round(v, 3) for k, v in report["timings"].items()},
        "rebuild_again_total_s": round(again_s, 2),
        "rebuild_again_timings": {k: round(v, 3) for k, v in again["timings"].items()},
        "rebuild_again_quantizer_from": again.get("quantizer_from"),
        "rebuild_again_recall_at_10": again["recall_at_10"],
        "vectors_per_s_read": round(n / report["timings"]["read_s"]),
        "index_type": report["index_type"],
        "recall_at_10": report["recall_at_10"],
        "search_params": report["search_params"],
        "file_mb": round(report["file_bytes"] / 2**20, 1),
        "reader_load_s": round(load_s, 3),
        "search": search,
        "filtered_search": _filtered_search(reader, q, n),
        "documents_bytes_per_doc": round(
            (settings.index_path / collection / files.meta_file(report["version"])).stat().st_size
            / n,
            1,
        ),
    }
    flat = faiss.IndexFlatIP(dim)
    flat.add(x)
    search["exact (Flat)"] = _latency_ms(lambda v: flat.search(v.reshape(1, -1), 10), q)
    if with_hnsw:
        t0 = time.perf_counter()
        built = build_index(Choice("IDMap2,HNSW32,Flat", "bench"), np.arange(n, dtype=np.int64), x)
        figures["hnsw_build_s"] = round(time.perf_counter() - t0, 2)
        figures["hnsw_recall_at_10"] = built.recall_at_10
        search["HNSW32"] = _latency_ms(lambda v: built.index.search(v.reshape(1, -1), 10), q)
    return figures


if __name__ == "__main__":
    import json
    import sys

    sizes = tuple(int(a) for a in sys.argv[1:]) or (100_000, 1_000_000)
    print(json.dumps(measure_index(sizes), indent=2))
