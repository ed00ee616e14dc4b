"""Vectors out of PostgreSQL: binary COPY parsed straight into numpy, in chunks.

A build reads ``(id, vector)`` with ``COPY … TO STDOUT (FORMAT BINARY)``. Every row has the
same width (one int64, one ``dim * 4`` byte bytea), so each chunk of the stream is parsed with
one structured-dtype ``np.frombuffer``: no per-row Python, no ORM. The doc ids come from a
second COPY in the same REPEATABLE READ snapshot, so both describe exactly the same rows.

Nothing here writes; every function runs in the caller's connection and transaction.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg

from afterwrite.core.errors import TransientError

COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_HEADER_FIXED = len(COPY_SIGNATURE) + 8  # flags (int32) + header extension length (int32)
PARSE_BYTES = 4 << 20

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: stage ``read``, ``build``, ``write``, ``check``."""


class SourceError(TransientError, RuntimeError):
    """The rows cannot be read as one consistent set of vectors this time; the next rebuild
    reads them again."""


@dataclass(frozen=True)
class ModelCount:
    model: str | None
    dims: tuple[int, ...]
    rows: int


@dataclass(frozen=True)
class Vectors:
    """``ids`` (int64, sorted ascending), the matching ``vectors`` and ``doc_ids``."""

    ids: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]
    doc_ids: list[str]

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def live_models(conn: psycopg.Connection[Any], collection: str) -> list[ModelCount]:
    """Models (and their dimensions) of the collection's live rows that carry a vector."""
    rows = conn.execute(
        "SELECT model, array_agg(DISTINCT dim ORDER BY dim), count(*) FROM embeddings"
        " WHERE collection = %s AND NOT deleted AND vector IS NOT NULL GROUP BY model",
        (collection,),
    ).fetchall()
    return [
        ModelCount(m, tuple(int(d) for d in dims if d is not None), int(n)) for m, dims, n in rows
    ]


def max_seq(conn: psycopg.Connection[Any], collection: str) -> int:
    """The highest ``seq`` of the collection visible now (0 for an empty collection)."""
    row = conn.execute(
        "SELECT coalesce(max(seq), 0) FROM embeddings WHERE collection = %s", (collection,)
    ).fetchone()
    return int(row[0]) if row else 0


def seq_watermark(conn: psycopg.Connection[Any], *, wait_s: float = 60.0) -> tuple[int, bool]:
    """A ``seq`` W such that every row with ``seq <= W`` is committed (or rolled back) now.

    ``seq`` values are drawn before their transaction commits, so "max(seq) in my snapshot"
    can be passed by a slower transaction that commits later with a smaller ``seq``; a build
    recording that max would never see such a row again (not in the build, not in any delta).
    So: read the sequence's last value first, then wait until every transaction in progress at
    that moment has ended. Returns ``(W, complete)``; ``complete`` is False when the wait
    timed out (a build still proceeds, and says so in its report).
    """
    row = conn.execute("SELECT last_value, is_called FROM embedding_seq").fetchone()
    assert row is not None
    watermark = int(row[0]) if row[1] else int(row[0]) - 1
    # Transactions of this database only (xids are cluster-wide; other databases' long
    # transactions must not hold a build up). Needs the writers' sessions to be visible:
    # the same role, or pg_read_all_stats.
    busy = conn.execute(
        "SELECT pid, backend_xid::text FROM pg_stat_activity WHERE datname = current_database()"
        " AND backend_xid IS NOT NULL AND pid <> pg_backend_pid()"
    ).fetchall()
    deadline = time.monotonic() + wait_s
    while busy:
        pids = [r[0] for r in busy]
        xids = [r[1] for r in busy]
        busy = conn.execute(
            "SELECT pid, backend_xid::text FROM pg_stat_activity"
            " WHERE pid = ANY(%s) AND backend_xid::text = ANY(%s)",
            (pids, xids),
        ).fetchall()
        busy = [r for r in busy if (r[0], r[1]) in set(zip(pids, xids, strict=True))]
        if not busy:
            break
        if time.monotonic() > deadline:
            return watermark, False
        time.sleep(0.02)
    return watermark, True


def count_rows(conn: psycopg.Connection[Any], collection: str, model: str, dim: int) -> int:
    row = conn.execute(
        "SELECT count(*) FROM embeddings WHERE collection = %s AND NOT deleted"
        " AND model = %s AND dim = %s AND octet_length(vector) = %s",
        (collection, model, dim, dim * 4),
    ).fetchone()
    return int(row[0]) if row else 0


def _row_dtype(dim: int) -> np.dtype[Any]:
    return np.dtype(
        [
            ("nfields", ">i2"),
            ("id_len", ">i4"),
            ("id", ">i8"),
            ("vec_len", ">i4"),
            ("vec", "<f4", (dim,)),
        ]
    )


class BinaryRowParser:
    """Incremental parser of a binary COPY stream of ``(bigint, bytea of dim float32)`` rows.

    ``feed(chunk)`` writes complete rows into the preallocated ``ids`` / ``vectors`` arrays and
    keeps a partial row for the next chunk. Any row that is not exactly that shape (a NULL, a
    vector of another length) raises :class:`SourceError`.
    """

    def __init__(self, dim: int, capacity: int) -> None:
        self.dim = dim
        self.dtype = _row_dtype(dim)
        self.row_size = self.dtype.itemsize
        self.ids = np.empty(capacity, dtype=np.int64)
        self.vectors = np.empty((capacity, dim), dtype=np.float32)
        self.count = 0
        self._buf = bytearray()
        self._header_done = False
        self._ended = False

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Take the next piece of the stream (any size). Parsing waits for ~4 MiB of input:
        libpq hands out one row per piece, and numpy pays off on many rows at once."""
        self._buf += chunk
        if len(self._buf) >= PARSE_BYTES:
            self._drain()

    def _drain(self) -> None:
        if not self._header_done:
            if len(self._buf) < _HEADER_FIXED:
                return
            if bytes(self._buf[: len(COPY_SIGNATURE)]) != COPY_SIGNATURE:
                raise SourceError("not a binary COPY stream")
            (ext_len,) = struct.unpack_from(">i", self._buf, len(COPY_SIGNATURE) + 4)
            if len(self._buf) < _HEADER_FIXED + ext_len:
                return
            del self._buf[: _HEADER_FIXED + ext_len]
            self._header_done = True
        if self._ended:
            if self._buf:
                raise SourceError("bytes after the end of the COPY stream")
            return
        n = len(self._buf) // self.row_size
        if n:
            # The 2-byte trailer can never fill a whole row slot: it is the last thing sent.
            self._store(np.frombuffer(self._buf, dtype=self.dtype, count=n))
            del self._buf[: n * self.row_size]
        if len(self._buf) == 2 and bytes(self._buf) == b"\xff\xff":
            self._ended = True
            self._buf.clear()

    def _store(self, rows: npt.NDArray[Any]) -> None:
        if not rows.size:
            return
        if (
            np.any(rows["nfields"] != 2)
            or np.any(rows["id_len"] != 8)
            or np.any(rows["vec_len"] != self.dim * 4)
        ):
            raise SourceError("a row's id or vector has an unexpected length")
        end = self.count + rows.shape[0]
        if end > self.ids.shape[0]:
            raise SourceError("more rows than counted in the same snapshot")
        self.ids[self.count : end] = rows["id"]
        self.vectors[self.count : end] = rows["vec"]
        self.count = end

    def finish(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        self._drain()
        if not self._ended or self._buf:
            raise SourceError("the COPY stream ended early or has trailing bytes")
        return self.ids[: self.count], self.vectors[: self.count]


LIVE_WHERE = (
    "collection = %s AND NOT deleted AND model = %s AND dim = %s AND octet_length(vector) = %s"
)
"""The rows a version is built from (bound with :func:`live_params`): what
:func:`read_vectors` and the documents read beside it both select."""


def live_params(collection: str, model: str, dim: int) -> tuple[str, str, int, int]:
    return (collection, model, dim, dim * 4)


def scan_in_heap_order(conn: psycopg.Connection[Any]) -> None:
    """Make this transaction's scans of ``embeddings`` stream rows in heap order.

    Two things shuffled a rebuild's rows: a parallel sequential scan (its ``Gather``
    interleaves the workers' pages) and synchronized scans (a large table's scan starts
    wherever the last scan of it was, even a finished or cut-short one). Sorting 1M vectors
    back into id order then cost 6-13 s (a 1.5 GB gather). One backend scanning from the
    first page streams a table written in id order in id order, so the sort is a no-op; on 2
    cores the parallel workers only competed with the client parsing the rows. JIT is off
    too: compiling the filter costs more than it saves on a scan bound by the client."""
    conn.execute("SET LOCAL synchronize_seqscans = off")
    conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
    conn.execute("SET LOCAL jit = off")


@dataclass(frozen=True)
class DocIds:
    """The rows' ``ids`` (ascending) and their ``doc_ids``, read in the snapshot the vectors
    are read in."""

    ids: npt.NDArray[np.int64]
    doc_ids: list[str]


def read_vectors(
    conn: psycopg.Connection[Any],
    collection: str,
    model: str,
    dim: int,
    *,
    progress: Progress | None = None,
    doc_ids: DocIds | None = None,
) -> Vectors:
    """The collection's live vectors of ``model``, sorted by id. Call inside one REPEATABLE
    READ transaction: the doc ids and the vectors then describe the same rows. ``doc_ids``:
    the rows' doc ids when already read in this transaction (a build reads them with the
    documents); otherwise read here first."""
    where, params = LIVE_WHERE, live_params(collection, model, dim)
    cur = conn.cursor()
    # The doc ids first, in id order: their count sizes the vector arrays exactly (no separate
    # count(*) scan), and they line up with the sorted vectors without a million-entry dict.
    if doc_ids is None:
        with cur.copy(
            f"COPY (SELECT id, doc_id FROM embeddings WHERE {where} ORDER BY id) TO STDOUT",
            params,
        ) as copy:
            text = b"".join(bytes(c) for c in copy)
        names, doc_row_ids = parse_id_text(text)
        del text
    else:
        names, doc_row_ids = doc_ids.doc_ids, doc_ids.ids
    total = len(names)
    parser = BinaryRowParser(dim, total)
    with cur.copy(
        f"COPY (SELECT id, vector FROM embeddings WHERE {where}) TO STDOUT (FORMAT BINARY)",
        params,
    ) as copy:
        last = 0
        for chunk in copy:
            parser.feed(chunk)
            if progress is not None and parser.count - last >= 20_000:
                last = parser.count
                progress("read", parser.count, total)
    ids, vectors = parser.finish()
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    vectors = vectors[order] if not is_identity(order) else vectors
    if not np.array_equal(doc_row_ids, ids):
        raise SourceError("the vectors and the doc ids do not describe the same rows")
    if progress is not None:
        progress("read", len(ids), total)
    return Vectors(ids, vectors, names)


def is_identity(order: npt.NDArray[np.intp]) -> bool:
    return bool(np.all(order == np.arange(order.shape[0])))


_TEXT_ESCAPES = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def parse_id_text(data: bytes) -> tuple[list[str], npt.NDArray[np.int64]]:
    """Doc ids and row ids, in stream order, from a text-format COPY of ``(bigint, text)``
    rows (one line each)."""
    docs: list[str] = []
    row_ids: list[int] = []
    for line in data.split(b"\n"):
        if not line:
            continue
        rid, _, doc = line.partition(b"\t")
        row_ids.append(int(rid))
        docs.append((_unescape(doc) if b"\\" in doc else doc).decode())
    return docs, np.asarray(row_ids, dtype=np.int64)


def _unescape(field: bytes) -> bytes:
    """Undo COPY text escaping (backslash sequences; doc ids never contain NUL)."""
    out = bytearray()
    i = 0
    while i < len(field):
        ch = field[i : i + 1]
        if ch == b"\\" and i + 1 < len(field):
            nxt = field[i + 1 : i + 2]
            if nxt in _TEXT_ESCAPES:
                out += _TEXT_ESCAPES[nxt]
                i += 2
                continue
            if nxt.isdigit():  # octal \ooo
                j = i + 1
                while j < min(i + 4, len(field)) and field[j : j + 1].isdigit():
                    j += 1
                out.append(int(field[i + 1 : j], 8))
                i = j
                continue
            if nxt == b"x":
                j = i + 2
                while j < min(i + 4, len(field)) and field[j : j + 1] in b"0123456789abcdefABCDEF":
                    j += 1
                out.append(int(field[i + 2 : j], 16))
                i = j
                continue
            out += nxt
            i += 2
            continue
        out += ch
        i += 1
    return bytes(out)


@dataclass(frozen=True)
class Changed:
    """Rows changed since a build: live ones of the index's model and dimension (to search
    exactly) and every changed id (to mask in the built index)."""

    ids: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]
    doc_ids: list[str]
    masked: npt.NDArray[np.int64]
    max_seq: int
    count: int


def read_changed(
    conn: psycopg.Connection[Any], collection: str, since_seq: int, model: str, dim: int
) -> Changed:
    """Every row of the collection with ``seq > since_seq`` (a small set: the changes since
    the last build; the ``(collection, seq)`` index finds them)."""
    rows = conn.execute(
        "SELECT id, doc_id, deleted, model, dim, vector, seq FROM embeddings"
        " WHERE collection = %s AND seq > %s ORDER BY id",
        (collection, since_seq),
    ).fetchall()
    live_ids: list[int] = []
    live_docs: list[str] = []
    blobs: list[bytes] = []
    masked: list[int] = []
    top = since_seq
    for rid, doc_id, deleted, row_model, row_dim, vector, seq in rows:
        top = max(top, int(seq))
        if not deleted and (row_model != model or row_dim != dim):
            # Re-embedded with another model or dimension (a change in progress): the main
            # index still holds this document's vector of the index's model; keep serving it
            # until the next build switches the whole collection.
            continue
        masked.append(int(rid))
        if (
            not deleted
            and row_model == model
            and row_dim == dim
            and vector is not None
            and len(vector) == dim * 4
        ):
            live_ids.append(int(rid))
            live_docs.append(doc_id)
            blobs.append(bytes(vector))
    vectors = (
        np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim).astype(np.float32)
        if blobs
        else np.empty((0, dim), dtype=np.float32)
    )
    return Changed(
        ids=np.asarray(live_ids, dtype=np.int64),
        vectors=vectors,
        doc_ids=live_docs,
        masked=np.asarray(masked, dtype=np.int64),
        max_seq=top,
        count=len(rows),
    )


def changed_key(
    conn: psycopg.Connection[Any], collection: str, since_seq: int
) -> tuple[int, int, int]:
    """``(count, max seq, sum of seq)`` of rows changed since ``since_seq``: moves on every
    commit, including a late commit that re-changes a row already counted, with a ``seq``
    below the current maximum (only the sum sees that one)."""
    row = conn.execute(
        "SELECT count(*), coalesce(max(seq), 0), coalesce(sum(seq), 0) FROM embeddings"
        " WHERE collection = %s AND seq > %s",
        (collection, since_seq),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def collections_with_vectors(conn: psycopg.Connection[Any]) -> list[str]:
    """Collections that have at least one row (a loose index scan over the unique key)."""
    rows = conn.execute(
        "WITH RECURSIVE c AS ("
        " (SELECT collection FROM embeddings ORDER BY collection LIMIT 1)"
        " UNION ALL SELECT (SELECT e.collection FROM embeddings e"
        "  WHERE e.collection > c.collection ORDER BY e.collection LIMIT 1)"
        " FROM c WHERE c.collection IS NOT NULL)"
        " SELECT collection FROM c WHERE collection IS NOT NULL"
    ).fetchall()
    return [r[0] for r in rows]
