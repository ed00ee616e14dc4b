"""Helpers for the index tests: vectors into ``embeddings``, changes, and a reader process."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg

from afterwrite.core.settings import Settings, load_settings
from afterwrite.demo.services import Endpoints
from benchmarks.index import clustered_vectors, insert_vectors

__all__ = ["clustered_vectors", "insert_vectors"]


def index_settings(endpoints: Endpoints, index_dir: Path, **overrides: Any) -> Settings:
    return load_settings(
        {},
        database_url=endpoints.database_url,
        redis_url=endpoints.redis_url,
        index_dir=index_dir,
        **overrides,
    )


def random_unit(n: int, dim: int, seed: int = 0) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def add(
    conn: psycopg.Connection[Any],
    collection: str,
    vectors: npt.NDArray[np.float32],
    *,
    model: str,
    prefix: str = "d",
    start: int = 0,
) -> list[str]:
    with conn.transaction():
        return insert_vectors(
            conn, collection, vectors, model=model, doc_prefix=prefix, start=start
        )


def upsert(
    conn: psycopg.Connection[Any],
    collection: str,
    doc_id: str,
    vector: npt.NDArray[np.float32],
    *,
    model: str,
) -> None:
    """What the embedding stage does for one document: new vector, new seq."""
    conn.execute(
        "INSERT INTO embeddings (collection, doc_id, job_id, model, dim, vector, enqueued_at,"
        " committed_at) VALUES (%s, %s, gen_random_uuid(), %s, %s, %s, now(), now())"
        " ON CONFLICT (collection, doc_id) DO UPDATE SET vector = excluded.vector,"
        " model = excluded.model, dim = excluded.dim, deleted = false,"
        " seq = nextval('embedding_seq'), embedded_at = now()",
        (collection, doc_id, model, vector.shape[0], vector.astype("<f4").tobytes()),
    )


def tombstone(conn: psycopg.Connection[Any], collection: str, doc_id: str) -> None:
    conn.execute(
        "UPDATE embeddings SET deleted = true, vector = NULL, seq = nextval('embedding_seq')"
        " WHERE collection = %s AND doc_id = %s",
        (collection, doc_id),
    )


def reader_process_main(argv: list[str]) -> None:
    """``python -c 'from tests.index_helpers import reader_process_main as m; m(sys.argv[1:])'
    <index_dir> <collection> <dim> <k> <stop_file>``: search until ``stop_file`` exists, then
    print one JSON line: searches, failures, versions seen, answers whose doc ids mix versions.

    Doc ids are ``g<generation>-…``: every answer must carry exactly one generation."""
    from afterwrite.readers.index_reader import IndexReader

    index_dir, collection, dim, k, stop = argv[0], argv[1], int(argv[2]), int(argv[3]), argv[4]
    reader = IndexReader(collection, index_dir, check_interval_s=0.01)
    rng = np.random.default_rng()
    out: dict[str, Any] = {
        "searches": 0,
        "failures": 0,
        "mixed": 0,
        "short": 0,
        "generations": [],
        "errors": [],
    }
    seen: set[str] = set()
    print("ready", flush=True)
    while not Path(stop).exists():
        time.sleep(0.001)  # 2 cores: leave the builder and PostgreSQL room to work
        q = rng.standard_normal(dim).astype(np.float32)
        try:
            hits = reader.search(q, k)
        except Exception as exc:  # counted and reported: the test asserts there are none
            out["failures"] += 1
            out["errors"].append(repr(exc))
            continue
        out["searches"] += 1
        gens = {doc.split("-", 1)[0] for doc, _ in hits}
        if len(gens) != 1:
            out["mixed"] += 1
        if len(hits) != k:
            out["short"] += 1
        seen |= gens
    out["generations"] = sorted(seen)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
