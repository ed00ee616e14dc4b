"""Documents beside an index version: text, metadata and the filter postings, no database.

``v<version>.meta`` travels with ``v<version>.faiss`` / ``.docs`` (its sha256 is in the
manifest, ``meta_sha256``), so a reader returns each hit's text and metadata and filters on
metadata without PostgreSQL. Rows are in the doc map's order (ids ascending): row ``i`` of
the ``.meta`` file is the document of ``DocMap.ids[i]``.

```
"AWMETA1\\n" + uint32 header length + header JSON, then, 8-byte aligned:
  text_off   uint64[n+1]   text of row i: text_blob[text_off[i]:text_off[i+1]] (UTF-8)
  meta_off   uint64[n+1]   metadata of row i: compact JSON, empty for none
  flags      uint8[n]      bit 0: text cut at the cap, bit 1: metadata cut at the cap
  keys       S16[m]        sorted 128-bit hashes of (key, value) pairs
  post_off   uint64[m+1]   rows of pair j: rows[post_off[j]:post_off[j+1]], ascending
  rows       int32[p]
  text_blob, meta_blob
```

Filterable: every top-level metadata key with a string (at most ``FILTER_VALUE_MAX_BYTES``),
integer or boolean value, whatever the metadata cap kept for display. A pair is found by its
blake2b-128 hash: two distinct pairs share a hash with probability ~p²/2¹²⁹ (nil in practice),
and no Python object per document or value is made when a version is loaded (``np.frombuffer``
views of the file's bytes).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from afterwrite.core.errors import TransientError

META_MAGIC = b"AWMETA1\n"
FILTER_VALUE_MAX_BYTES = 256
"""A string value longer than this (UTF-8) is not filterable (it is still returned)."""
MAX_WHERE_VALUES = 1024
"""Values in one ``where``, over all keys."""
TEXT_CUT = 1
META_CUT = 2


class DocumentsError(TransientError, ValueError):
    """A ``.meta`` file that does not decode (``files.load_version`` reports it as an
    ``IndexFileError``: the reader keeps its version, the next publish replaces the file)."""


Scalar = str | int | bool
Where = Mapping[str, Scalar | Sequence[Scalar]]


# --- filter pairs --------------------------------------------------------------------------


def _canonical(value: Any) -> bytes | None:
    """The bytes a filterable value hashes as (None: not filterable). A bool is not an int."""
    if isinstance(value, bool):
        return b"b1" if value else b"b0"
    if isinstance(value, int):
        return b"i" + str(value).encode()
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
        return b"s" + raw if len(raw) <= FILTER_VALUE_MAX_BYTES else None
    return None


def pair_hash(key: str, value: Any) -> bytes | None:
    canonical = _canonical(value)
    if canonical is None:
        return None
    raw_key = key.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(
        struct.pack("<I", len(raw_key)) + raw_key + canonical, digest_size=16
    ).digest()


def filter_pairs(metadata: Mapping[str, Any] | None) -> list[tuple[str, Scalar]]:
    """The filterable ``(key, value)`` pairs of ``metadata``, in key order."""
    if not isinstance(metadata, Mapping):
        return []
    return [
        (k, v)
        for k, v in sorted(metadata.items())
        if isinstance(k, str) and _canonical(v) is not None
    ]


def check_where(where: Any) -> dict[str, list[Scalar]] | None:
    """``where`` as ``{key: [values]}`` (None: no filter). Raises ValueError naming what is
    wrong: a key that is not a non-empty string, a value that is not a string, integer or
    boolean (or a non-empty list of them), too many values."""
    if where is None or (isinstance(where, Mapping) and not where):
        return None
    if not isinstance(where, Mapping):
        raise ValueError(f"where must be a mapping of metadata keys to values, not {where!r}")
    out: dict[str, list[Scalar]] = {}
    total = 0
    for key, value in where.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"where: keys are non-empty strings, got {key!r}")
        values = list(value) if isinstance(value, list | tuple | set | frozenset) else [value]
        if not values:
            raise ValueError(f"where[{key!r}]: an empty list matches nothing; leave the key out")
        for v in values:
            if isinstance(v, Mapping):
                raise ValueError(
                    f"where[{key!r}]: nested filters are not supported (only equality and"
                    " membership on top-level keys)"
                )
            if isinstance(v, float) or not isinstance(v, str | int):
                raise ValueError(
                    f"where[{key!r}]: values are strings, integers or booleans, got {v!r}"
                )
        # once each (True and 1 are different values, so not a plain dict of values)
        values = list({(v.__class__, v): v for v in values}.values())
        total += len(values)
        out[key] = values
    if total > MAX_WHERE_VALUES:
        raise ValueError(f"where: {total} values, at most {MAX_WHERE_VALUES}")
    return out


# --- caps ----------------------------------------------------------------------------------


def cap_text(text: str | None, max_bytes: int) -> tuple[bytes, bool]:
    """UTF-8 of ``text`` cut to ``max_bytes`` at a character boundary; True when cut."""
    if not text:
        return b"", False
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= max_bytes:
        return raw, False
    return raw[:max_bytes].decode("utf-8", "ignore").encode(), True


def cap_metadata(metadata: Mapping[str, Any] | None, max_bytes: int) -> tuple[bytes, bool]:
    """Compact JSON of ``metadata``; over ``max_bytes``, its filterable pairs (key order) that
    fit, and True. Filtering never depends on this cut: postings come from the whole."""
    if metadata is None:
        return b"", False
    raw = _dumps(metadata)
    if len(raw) <= max_bytes:
        return raw, False
    kept: dict[str, Any] = {}
    for k, v in filter_pairs(metadata):
        kept[k] = v
        if len(_dumps(kept)) > max_bytes:
            del kept[k]
            break
    return (_dumps(kept) if kept else b""), True


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"
    )


# --- the .meta file ------------------------------------------------------------------------


@dataclass
class DocumentsBuilder:
    """Rows appended in doc-map order (:meth:`add`), postings per ``(key, value)`` pair
    (:meth:`add_postings`); ``encode`` makes the ``.meta`` file."""

    text_max_bytes: int
    metadata_max_bytes: int
    _texts: list[bytes] = field(default_factory=list)
    _metas: list[bytes] = field(default_factory=list)
    _flags: bytearray = field(default_factory=bytearray)
    _postings: dict[bytes, npt.NDArray[np.int32]] = field(default_factory=dict)
    _key_docs: dict[str, int] = field(default_factory=dict)

    def add(self, text: str | None, metadata_json: str | None) -> None:
        """One row: its text and its metadata as JSON text (as PostgreSQL prints ``jsonb``;
        kept verbatim when under the cap, so most rows are never parsed here)."""
        flags = 0
        t = text.encode() if text else b""
        if len(t) > self.text_max_bytes:
            t, _ = cap_text(text, self.text_max_bytes)
            flags |= TEXT_CUT
        m = metadata_json.encode() if metadata_json is not None else b""
        if len(m) > self.metadata_max_bytes:
            m, _ = cap_metadata(json.loads(m), self.metadata_max_bytes)
            flags |= META_CUT
        self._texts.append(t)
        self._metas.append(m)
        self._flags.append(flags)

    def reorder(self, order: npt.NDArray[np.intp]) -> None:
        """Put the rows added so far in ``order`` (row ``i`` becomes the old ``order[i]``);
        before any postings are added."""
        assert not self._postings, "reorder before add_postings"
        picks = order.tolist()
        self._texts = [self._texts[i] for i in picks]
        self._metas = [self._metas[i] for i in picks]
        self._flags = bytearray(np.frombuffer(self._flags, dtype=np.uint8)[order].tobytes())

    def add_postings(self, key: str, value: Any, rows: npt.NDArray[np.int32]) -> None:
        """The rows (ascending) whose metadata has ``key == value``; an unfilterable value
        (float, long string, nested) is ignored."""
        h = pair_hash(key, value)
        if h is None or not len(rows):
            return
        if h in self._postings:  # the same value spelled twice (1 and 1.0 in jsonb text)
            rows = np.union1d(self._postings[h], rows).astype(np.int32)
            self._key_docs[key] -= len(self._postings[h])
        self._postings[h] = rows
        self._key_docs[key] = self._key_docs.get(key, 0) + len(rows)

    def __len__(self) -> int:
        return len(self._texts)

    def encode(self) -> list[bytes | memoryview]:
        n = len(self._texts)
        keys = sorted(self._postings)
        post_off = np.zeros(len(keys) + 1, dtype="<u8")
        if keys:
            np.cumsum([len(self._postings[h]) for h in keys], out=post_off[1:])
        rows = (
            np.concatenate([self._postings[h] for h in keys]).astype("<i4")
            if keys
            else np.empty(0, dtype="<i4")
        )
        sections: list[bytes] = [
            _offsets(self._texts).tobytes(),
            _offsets(self._metas).tobytes(),
            bytes(self._flags),
            b"".join(keys),
            post_off.tobytes(),
            rows.tobytes(),
            b"".join(self._texts),
            b"".join(self._metas),
        ]
        header = json.dumps(
            {
                "count": n,
                "pairs": len(keys),
                "postings": int(post_off[-1]),
                "sections": [len(s) for s in sections],
                "filter_keys": dict(sorted(self._key_docs.items())),
                "text_max_bytes": self.text_max_bytes,
                "metadata_max_bytes": self.metadata_max_bytes,
            }
        ).encode()
        out: list[bytes | memoryview] = [META_MAGIC, struct.pack("<I", len(header)), header]
        pos = len(META_MAGIC) + 4 + len(header)
        for s in sections:
            pad = -pos % 8
            out += [b"\x00" * pad, s]
            pos += pad + len(s)
        return out


def _offsets(parts: list[bytes]) -> npt.NDArray[np.uint64]:
    off = np.zeros(len(parts) + 1, dtype="<u8")
    if parts:
        np.cumsum([len(p) for p in parts], out=off[1:])
    return off


@dataclass(frozen=True)
class Documents:
    """A version's documents and postings (views of the ``.meta`` file's bytes)."""

    count: int
    text_off: npt.NDArray[np.uint64]
    meta_off: npt.NDArray[np.uint64]
    flags: npt.NDArray[np.uint8]
    keys: npt.NDArray[np.bytes_]
    post_off: npt.NDArray[np.uint64]
    rows: npt.NDArray[np.int32]
    text_blob: memoryview
    meta_blob: memoryview
    filter_keys: dict[str, int]
    caps: tuple[int, int]

    def document(self, row: int) -> tuple[str, Any, bool, bool]:
        """``(text, metadata, text_cut, metadata_cut)`` of ``row``."""
        text = bytes(self.text_blob[int(self.text_off[row]) : int(self.text_off[row + 1])])
        meta = bytes(self.meta_blob[int(self.meta_off[row]) : int(self.meta_off[row + 1])])
        flags = int(self.flags[row])
        return (
            text.decode("utf-8", "surrogatepass"),
            json.loads(meta) if meta else None,
            bool(flags & TEXT_CUT),
            bool(flags & META_CUT),
        )

    def postings(self, key: str, value: Scalar) -> npt.NDArray[np.int32]:
        """Rows whose metadata has ``key == value`` (ascending; empty when none)."""
        h = pair_hash(key, value)
        if h is None or not len(self.keys):
            return np.empty(0, dtype=np.int32)
        j = int(np.searchsorted(self.keys, np.bytes_(h)))
        if j >= len(self.keys) or bytes(self.keys[j]) != h:
            return np.empty(0, dtype=np.int32)
        return self.rows[int(self.post_off[j]) : int(self.post_off[j + 1])]


def decode_documents(data: bytes) -> Documents:
    if not data.startswith(META_MAGIC) or len(data) < len(META_MAGIC) + 4:
        raise DocumentsError("documents: bad magic")
    (hlen,) = struct.unpack_from("<I", data, len(META_MAGIC))
    pos = len(META_MAGIC) + 4
    try:
        h = json.loads(data[pos : pos + hlen])
        n, m, p = int(h["count"]), int(h["pairs"]), int(h["postings"])
        sizes = [int(s) for s in h["sections"]]
        filter_keys = {str(k): int(v) for k, v in dict(h["filter_keys"]).items()}
        caps = (int(h["text_max_bytes"]), int(h["metadata_max_bytes"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise DocumentsError(f"documents: bad header ({exc})") from None
    expected = [8 * (n + 1), 8 * (n + 1), n, 16 * m, 8 * (m + 1), 4 * p]
    if len(sizes) != 8 or sizes[:6] != expected:
        raise DocumentsError("documents: section sizes do not match the header")
    pos += hlen
    view = memoryview(data)
    parts: list[memoryview] = []
    for size in sizes:
        pos += -pos % 8
        if pos + size > len(data):
            raise DocumentsError("documents: truncated")
        parts.append(view[pos : pos + size])
        pos += size
    text_off = np.frombuffer(parts[0], dtype="<u8")
    meta_off = np.frombuffer(parts[1], dtype="<u8")
    post_off = np.frombuffer(parts[4], dtype="<u8")
    if (
        int(text_off[-1]) != sizes[6]
        or int(meta_off[-1]) != sizes[7]
        or int(post_off[-1]) != p
        or np.any(np.diff(text_off.astype(np.int64)) < 0)
        or np.any(np.diff(meta_off.astype(np.int64)) < 0)
    ):
        raise DocumentsError("documents: offsets do not match the data")
    rows = np.frombuffer(parts[5], dtype="<i4")
    if p and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise DocumentsError("documents: a posting names a row out of range")
    return Documents(
        count=n,
        text_off=text_off,
        meta_off=meta_off,
        flags=np.frombuffer(parts[2], dtype=np.uint8),
        keys=np.frombuffer(parts[3], dtype="S16"),
        post_off=post_off,
        rows=rows,
        text_blob=parts[6],
        meta_blob=parts[7],
        filter_keys=filter_keys,
        caps=caps,
    )


def delta_documents(
    texts: Sequence[str | None],
    metadatas: Sequence[Mapping[str, Any] | None],
    *,
    text_max_bytes: int,
    metadata_max_bytes: int,
) -> list[list[Any]]:
    """JSON-able rows for a delta: ``[text, metadata, flags, filter pairs]`` each, capped like
    a version's rows."""
    out: list[list[Any]] = []
    for text, meta in zip(texts, metadatas, strict=True):
        t, t_cut = cap_text(text, text_max_bytes)
        m, m_cut = cap_metadata(meta, metadata_max_bytes)
        flags = (TEXT_CUT if t_cut else 0) | (META_CUT if m_cut else 0)
        pairs = [[k, v] for k, v in filter_pairs(meta)]
        out.append([t.decode("utf-8", "surrogatepass"), json.loads(m) if m else None, flags, pairs])
    return out


def iter_hashes(pairs: Iterable[Sequence[Any]]) -> Iterator[bytes]:
    for k, v in pairs:
        h = pair_hash(str(k), v)
        if h is not None:
            yield h


def stored(row: Sequence[Any]) -> tuple[str, Any, bool, bool]:
    """``(text, metadata, text_cut, metadata_cut)`` of a delta row
    (:func:`delta_documents`)."""
    flags = int(row[2])
    return str(row[0]), row[1], bool(flags & TEXT_CUT), bool(flags & META_CUT)


def delta_postings(documents: list[list[Any]]) -> dict[bytes, npt.NDArray[np.int64]]:
    """``pair hash -> delta rows`` for a delta's documents (built once per delta)."""
    postings: dict[bytes, list[int]] = {}
    for row, doc in enumerate(documents):
        for h in iter_hashes(doc[3]):
            postings.setdefault(h, []).append(row)
    return {h: np.asarray(r, dtype=np.int64) for h, r in postings.items()}


def delta_rows(
    postings: Mapping[bytes, npt.NDArray[np.int64]], where: Mapping[str, list[Scalar]]
) -> npt.NDArray[np.int64]:
    """Delta rows matching ``where`` (ascending)."""
    rows: npt.NDArray[np.int64] | None = None
    for key, values in where.items():
        hashes = [pair_hash(key, v) for v in values]
        parts = [postings[h] for h in hashes if h is not None and h in postings]
        union = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
        rows = union if rows is None else np.intersect1d(rows, union, assume_unique=True)
        if not len(rows):
            break
    return rows if rows is not None else np.empty(0, dtype=np.int64)
