"""Texts and metadata out of PostgreSQL for an index version and its delta.

A build reads them with one more ``COPY`` in the snapshot that read the vectors (rows in id
order, so they line up with the doc map), cut in SQL to the text cap first (a 200,000-character
text never crosses the wire whole). Nothing here writes; every function runs in the caller's
connection and transaction.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql

from afterwrite.vectorindex.documents import DocumentsBuilder, delta_documents
from afterwrite.worker.index.source import SourceError

_LIVE = "collection = %s AND NOT deleted AND model = %s AND dim = %s AND octet_length(vector) = %s"


def read_documents(
    conn: psycopg.Connection[Any],
    collection: str,
    model: str,
    dim: int,
    *,
    text_max_bytes: int,
    metadata_max_bytes: int,
) -> tuple[DocumentsBuilder, npt.NDArray[np.int64]]:
    """The documents of the rows ``source.read_vectors`` reads (same ``WHERE``), in id order,
    with their filter postings, and the ids they belong to. One scan, CSV parsed by the C
    ``csv`` module, each row's metadata parsed once (grouping pairs in SQL with ``jsonb_each``
    cost PostgreSQL ~11 µs a row, more than all of this)."""
    out = DocumentsBuilder(text_max_bytes, metadata_max_bytes)
    row_ids: list[int] = []
    groups: dict[tuple[str, type, Any], list[int]] = {}
    csv.field_size_limit(max(csv.field_size_limit(), text_max_bytes + (1 << 20)))
    with conn.cursor().copy(
        f"COPY (SELECT id, left(text, {int(text_max_bytes)}), metadata::text"
        f" FROM embeddings WHERE {_LIVE} ORDER BY id) TO STDOUT (FORMAT CSV)",
        (collection, model, dim, dim * 4),
    ) as copy:
        # libpq hands out exactly one COPY row per piece
        lines = (bytes(chunk).decode() for chunk in copy)
        add, loads = out.add, json.loads
        for row, (rid, text, meta) in enumerate(csv.reader(lines)):
            row_ids.append(int(rid))
            add(text, meta or None)
            if not meta.startswith("{"):
                continue
            for key, value in loads(meta).items():
                kind = value.__class__
                if kind is str or kind is int or kind is bool:
                    pair = (key, kind, value)  # the type: True and 1 are different values
                    group = groups.get(pair)
                    if group is None:
                        groups[pair] = [row]
                    else:
                        group.append(row)
    for (key, _, value), rows in groups.items():
        out.add_postings(key, value, np.asarray(rows, dtype=np.int32))
    return out, np.asarray(row_ids, dtype=np.int64)


class ConcurrentRead:
    """:func:`read_documents` on a second connection, in a thread, in the snapshot of
    ``conn``'s current REPEATABLE READ transaction (``pg_export_snapshot``), while the caller
    reads the vectors on ``conn``: PostgreSQL scans for both at once, and the ~5 µs a row of
    Python here overlaps the vector read instead of adding to it."""

    def __init__(
        self,
        url: str,
        conn: psycopg.Connection[Any],
        collection: str,
        model: str,
        dim: int,
        *,
        text_max_bytes: int,
        metadata_max_bytes: int,
    ) -> None:
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="afterwrite-documents"
        )
        self._future = self._pool.submit(
            self._read, url, str(row[0]), collection, model, dim,
            text_max_bytes, metadata_max_bytes,
        )  # fmt: skip

    @staticmethod
    def _read(
        url: str, snapshot: str, collection: str, model: str, dim: int, text_max: int,
        meta_max: int,
    ) -> tuple[DocumentsBuilder, npt.NDArray[np.int64]]:  # fmt: skip
        with psycopg.connect(url) as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            return read_documents(
                conn, collection, model, dim, text_max_bytes=text_max, metadata_max_bytes=meta_max
            )

    def result(self, ids: npt.NDArray[np.int64]) -> DocumentsBuilder:
        """The documents, checked to be those of ``ids`` (the vectors read meanwhile). Call
        while the exporting transaction is still open."""
        try:
            built, row_ids = self._future.result()
        finally:
            self._pool.shutdown(wait=True)
        if not np.array_equal(row_ids, ids):
            raise SourceError("the documents and the vectors do not describe the same rows")
        return built

    def cancel(self) -> None:
        """Wait for the thread (after the caller failed): nothing is left running."""
        self._pool.shutdown(wait=True)


def read_changed_documents(
    conn: psycopg.Connection[Any],
    ids: npt.NDArray[np.int64],
    *,
    text_max_bytes: int,
    metadata_max_bytes: int,
) -> list[list[Any]]:
    """The delta rows' documents (``files.Delta.documents``), in ``ids`` order; call in the
    snapshot that read the changed rows."""
    if not len(ids):
        return []
    rows = conn.execute(
        "SELECT id, left(text, %s), metadata FROM embeddings WHERE id = ANY(%s)",
        (text_max_bytes, ids.tolist()),
    ).fetchall()
    by_id = {int(r[0]): (r[1], r[2]) for r in rows}
    if len(by_id) != len(ids):
        raise SourceError("a changed row vanished inside its snapshot")
    found = [by_id[int(i)] for i in ids]
    return delta_documents(
        [t for t, _ in found],
        [m for _, m in found],
        text_max_bytes=text_max_bytes,
        metadata_max_bytes=metadata_max_bytes,
    )
