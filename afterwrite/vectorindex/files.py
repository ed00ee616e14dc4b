"""The index directory on disk: file names, atomic writes, and verified loading.

Shared by the builder (writes) and ``afterwrite.IndexReader`` (reads); no database here.

```
<index_path>/<collection>/
    manifest.json          the published version (atomically replaced; readers stat it)
    v00000007.faiss        FAISS's own serialisation (faiss.write_index format), ids inside
    v00000007.docs         id -> doc_id map: "AWDOCS1\\n", header JSON, int64 ids, doc ids
    v00000007.meta         each document's text and metadata (capped) and the metadata
                           filter postings, in doc-map order (vectorindex.documents)
    v00000007.json         that version's manifest (what rollback re-publishes)
    v00000007.delta        vectors and masks changed since v7's build (freshness), replaced
                           every few seconds; written before the manifest names v7, so a
                           reader switching to v7 finds its delta ready
    .tmp-*                 a write in progress, or left by a builder that died (removed by the
                           next builder, which holds the collection's lock)
```

Every file is written to a temporary name in the same directory, fsynced, ``os.replace``d into
place and the directory fsynced, so a reader (or a crash) sees the old file or the new one,
never a torn one. Files are private (mode 0600, whatever the umask): readers run as the
workers' user. The manifest is written last and names the sha256 of the version files and of
the current delta (``delta_sha256``, re-written with each delta); a reader hashes exactly the
bytes it deserialises, serves a delta only when the manifest names its hash, and runs a probe
search on a version before serving it. Nothing is pickled.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import queue
import re
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from afterwrite.core.errors import TransientError
from afterwrite.vectorindex import documents as docs_format

MANIFEST = "manifest.json"
DOCS_MAGIC = b"AWDOCS1\n"
DELTA_MAGIC = b"AWDELTA1"
TMP_PREFIX = ".tmp-"
_VERSION_FILE = re.compile(r"^v(\d{8})\.(faiss|docs|meta|json|delta)$")
WRITE_CHUNK_BYTES = 8 << 20
FILE_MODE = 0o600
"""Every index file is private to the workers' user (and readers running as it)."""

WriteProgress = Callable[[int, int], None]


class IndexFileError(TransientError, ValueError):
    """A published file is missing, truncated, corrupt or inconsistent with its manifest.

    Transient for a reader: it keeps the version it has, and the next publish replaces the file."""


def index_file(version: int) -> str:
    return f"v{version:08d}.faiss"


def docs_file(version: int) -> str:
    return f"v{version:08d}.docs"


def meta_file(version: int) -> str:
    return f"v{version:08d}.meta"


def version_manifest_file(version: int) -> str:
    return f"v{version:08d}.json"


def delta_file(version: int) -> str:
    return f"v{version:08d}.delta"


def versions_on_disk(directory: Path) -> list[int]:
    """Complete versions in ``directory`` (an index file and its manifest copy), ascending.
    Files of a build that died or lost a race before writing its manifest copy are not a
    version: rollback never picks them and prune removes them."""
    faiss_files: set[int] = set()
    manifests: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            m = _VERSION_FILE.match(name)
            if m and m.group(2) == "faiss":
                faiss_files.add(int(m.group(1)))
            elif m and name == version_manifest_file(int(m.group(1))):
                manifests.add(int(m.group(1)))
    return sorted(faiss_files & manifests)


def incomplete_versions(directory: Path) -> list[int]:
    """Version numbers with files on disk but no manifest copy."""
    numbers: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            m = _VERSION_FILE.match(name)
            if m:
                numbers.add(int(m.group(1)))
    return sorted(numbers - set(versions_on_disk(directory)))


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path,
    parts: Iterator[bytes | memoryview] | list[bytes | memoryview],
    *,
    total: int = 0,
    progress: WriteProgress | None = None,
) -> str:
    """Write ``parts`` to ``path`` atomically (temp file in the same directory, fsync,
    ``os.replace``, directory fsync); return the sha256 of what was written."""
    directory = path.parent
    digest = hashlib.sha256()
    # Hashing runs in a thread beside the writes (both release the GIL): on a 1.5 GB index
    # that hides the ~1 s of sha256 behind the ~2 s of writing.
    hashing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="afterwrite-sha256")
    pending: concurrent.futures.Future[None] | None = None
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            done = 0
            for part in parts:
                view = memoryview(part).cast("B")
                for start in range(0, len(view), WRITE_CHUNK_BYTES):
                    piece = view[start : start + WRITE_CHUNK_BYTES]
                    if pending is not None:
                        pending.result()  # in order, at most one chunk ahead
                    pending = hashing.submit(digest.update, piece)
                    written = 0
                    while written < len(piece):
                        written += f.write(piece[written:]) or 0
                    done += len(piece)
                    if progress is not None:
                        progress(done, total)
            if pending is not None:
                pending.result()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        hashing.shutdown(wait=True)
    fsync_dir(directory)
    return digest.hexdigest()


def write_index_atomic(
    path: Path, index: faiss.Index, *, progress: WriteProgress | None = None
) -> tuple[str, int]:
    """Write ``index`` in FAISS's format to ``path`` atomically (as :func:`write_atomic`);
    return its sha256 and size.

    FAISS streams its serialisation straight into the file (through a bounded queue to
    :func:`write_atomic`, which hashes beside the writes), instead of ``serialize_index``
    building the whole file in memory first: for 1M x 384 that was two extra copies of
    1.5 GB (FAISS's buffer, then numpy's) and ~5-13 s of a rebuild."""
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=4)
    stop = threading.Event()

    def put(item: bytes | BaseException | None) -> None:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _WriteAbandoned

    def emit(data: bytes) -> int:
        put(data)
        return len(data)

    def serialise() -> None:
        try:
            writer = faiss.PyCallbackIOWriter(emit, WRITE_CHUNK_BYTES)  # type: ignore[attr-defined]
            faiss.write_index(index, writer)
            put(None)
        except _WriteAbandoned:
            pass
        except BaseException as exc:  # handed to the writing thread, which raises it
            with contextlib.suppress(_WriteAbandoned):
                put(exc)

    def parts() -> Iterator[bytes]:
        while True:
            item = chunks.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    total = _estimated_size(index)

    def counted(done: int, _: int) -> None:
        if progress is not None:
            progress(done, max(total, done))

    producer = threading.Thread(target=serialise, name="afterwrite-index-write", daemon=True)
    producer.start()
    try:
        sha = write_atomic(path, parts(), total=total, progress=counted)
    finally:
        stop.set()
        producer.join()
    return sha, path.stat().st_size


class _WriteAbandoned(TransientError):
    """The file write failed: the FAISS serialisation feeding it stops. It never leaves
    :func:`write_index_atomic` (the file write's own error does); were it to, a write that
    was abandoned part-way is one to retry, hence transient."""


def _estimated_size(index: faiss.Index) -> int:
    """About the size of ``index``'s file (for write progress): its codes and ids (a float
    vector each where FAISS has no standalone code size, e.g. HNSW)."""
    try:
        code = int(index.sa_code_size())
    except RuntimeError:
        code = 4 * int(index.d)
    return int(index.ntotal) * (code + 8) + (1 << 20)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, [json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"])


STALE_TMP_S = 600.0
"""A temporary file untouched this long belongs to a writer that died."""


def remove_temporaries(directory: Path, *, older_than_s: float = STALE_TMP_S) -> int:
    """Delete ``.tmp-*`` files of writers that died. Index and doc-map temporaries are only
    ever written by the build-lock holder (the caller), so they go at once; delta and manifest
    temporaries may belong to a refresh or rollback running right now under another lock, so
    only those untouched for ``older_than_s`` go."""
    removed = 0
    cutoff = time.time() - older_than_s
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            if not name.startswith(TMP_PREFIX):
                continue
            shared = (
                ".delta." in name
                or name.startswith(f"{TMP_PREFIX}{MANIFEST}")
                or (".json." in name)
            )
            with contextlib.suppress(FileNotFoundError):
                if not shared or (directory / name).stat().st_mtime < cutoff:
                    os.unlink(directory / name)
                    removed += 1
    return removed


# --- the id -> doc_id map ------------------------------------------------------------------


def encode_docs(
    ids: npt.NDArray[np.int64], doc_ids: list[str], *, model: str, dim: int
) -> list[bytes | memoryview]:
    """``AWDOCS1\\n`` + uint32 header length + header JSON + int64 ids (little-endian, sorted)
    + NUL-separated UTF-8 doc ids (a doc id never contains NUL)."""
    header = json.dumps({"count": len(doc_ids), "model": model, "dim": dim}).encode()
    ids_le = np.ascontiguousarray(ids, dtype="<i8")
    return [
        DOCS_MAGIC,
        struct.pack("<I", len(header)),
        header,
        ids_le.tobytes(),
        "\x00".join(doc_ids).encode(),
    ]


@dataclass(frozen=True)
class DocMap:
    ids: npt.NDArray[np.int64]
    doc_ids: list[bytes]
    model: str
    dim: int

    def positions(
        self, ids: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        """Rows of ``ids`` in the map, and which of them are in it at all."""
        if not len(self.ids):
            return np.zeros(len(ids), dtype=np.intp), np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return pos, self.ids[pos] == ids

    def lookup(self, ids: npt.NDArray[np.int64]) -> list[str | None]:
        """doc ids of ``ids`` (None for an id not in the map, e.g. FAISS's -1)."""
        if not len(self.ids):
            return [None] * len(ids)
        pos = np.searchsorted(self.ids, ids)
        pos = np.minimum(pos, len(self.ids) - 1)
        hit = self.ids[pos] == ids
        return [self.doc_ids[p].decode() if h else None for p, h in zip(pos, hit, strict=True)]


def decode_docs(data: bytes) -> DocMap:
    if not data.startswith(DOCS_MAGIC) or len(data) < len(DOCS_MAGIC) + 4:
        raise IndexFileError("doc map: bad magic")
    (hlen,) = struct.unpack_from("<I", data, len(DOCS_MAGIC))
    start = len(DOCS_MAGIC) + 4
    try:
        header = json.loads(data[start : start + hlen])
        count = int(header["count"])
    except (ValueError, KeyError, TypeError) as exc:
        raise IndexFileError(f"doc map: bad header ({exc})") from None
    ids_start = start + hlen
    ids_end = ids_start + 8 * count
    if len(data) < ids_end:
        raise IndexFileError("doc map: truncated")
    ids = np.frombuffer(data, dtype="<i8", count=count, offset=ids_start).astype(np.int64)
    names = data[ids_end:].split(b"\x00") if count else []
    if len(names) != count:
        raise IndexFileError(f"doc map: {len(names)} doc ids for {count} ids")
    return DocMap(ids, names, str(header["model"]), int(header["dim"]))


# --- the freshness delta -------------------------------------------------------------------


@dataclass(frozen=True)
class Delta:
    """Changes since the build of ``base_version``: ``masked`` ids are hidden in the built
    index; ``ids`` / ``vectors`` / ``doc_ids`` (live, changed or new) are searched exactly."""

    base_version: int
    max_seq: int
    model: str
    dim: int
    ids: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]
    doc_ids: list[str]
    masked: npt.NDArray[np.int64]
    built_at: float
    source_key: tuple[int, ...] = ()
    """What the rows it was made from looked like (``source.changed_key``): a refresh that
    finds the same key has nothing to publish."""
    documents: list[list[Any]] = field(default_factory=list)
    """Per live row: ``[text, metadata, flags, filter pairs]``
    (:func:`afterwrite.vectorindex.documents.delta_documents`); empty in a delta written
    before documents travelled with the index."""


def encode_delta(delta: Delta) -> list[bytes | memoryview]:
    """``AWDELTA1`` + uint32 header length + header JSON (incl. sha256 of the body, and the
    live rows' ``documents``) + body: int64 ids, float32 vectors, int64 masked ids,
    NUL-separated doc ids. The documents sit in the header, where a reader of the format
    before them ignores an unknown key; the manifest's ``delta_sha256`` covers the whole file."""
    ids = np.ascontiguousarray(delta.ids, dtype="<i8").tobytes()
    vectors = np.ascontiguousarray(delta.vectors, dtype="<f4").tobytes()
    masked = np.ascontiguousarray(delta.masked, dtype="<i8").tobytes()
    docs = "\x00".join(delta.doc_ids).encode()
    body = ids + vectors + masked + docs
    header = json.dumps(
        {
            "base_version": delta.base_version,
            "max_seq": delta.max_seq,
            "model": delta.model,
            "dim": delta.dim,
            "count": len(delta.doc_ids),
            "masked": len(delta.masked),
            "built_at": delta.built_at,
            "source_key": list(delta.source_key),
            "sha256": hashlib.sha256(body).hexdigest(),
            "documents": delta.documents,
        },
        ensure_ascii=False,
    ).encode("utf-8", "surrogatepass")
    return [DELTA_MAGIC, struct.pack("<I", len(header)), header, body]


def bound_delta(data: bytes, manifest: dict[str, Any]) -> Delta | None:
    """The delta in ``data`` if ``manifest`` binds it (names its sha256), else None when the
    manifest binds no delta. Raises :class:`IndexFileError` for a delta the manifest does not
    name (forged, stale, or replaced since the manifest was read) or a damaged one."""
    expected = manifest.get("delta_sha256")
    if expected is None:
        return None
    if hashlib.sha256(data).hexdigest() != expected:
        raise IndexFileError("delta: sha256 does not match the manifest's delta_sha256")
    return decode_delta(data)


def decode_delta(data: bytes) -> Delta:
    if not data.startswith(DELTA_MAGIC) or len(data) < len(DELTA_MAGIC) + 4:
        raise IndexFileError("delta: bad magic")
    (hlen,) = struct.unpack_from("<I", data, len(DELTA_MAGIC))
    start = len(DELTA_MAGIC) + 4
    try:
        h = json.loads(data[start : start + hlen])
        count, nmask, dim = int(h["count"]), int(h["masked"]), int(h["dim"])
    except (ValueError, KeyError, TypeError) as exc:
        raise IndexFileError(f"delta: bad header ({exc})") from None
    body = data[start + hlen :]
    if hashlib.sha256(body).hexdigest() != h.get("sha256"):
        raise IndexFileError("delta: checksum mismatch")
    off = 0
    ids = np.frombuffer(body, dtype="<i8", count=count, offset=off).astype(np.int64)
    off += 8 * count
    vectors = (
        np.frombuffer(body, dtype="<f4", count=count * dim, offset=off)
        .reshape(count, dim)
        .astype(np.float32)
    )
    off += 4 * count * dim
    masked = np.frombuffer(body, dtype="<i8", count=nmask, offset=off).astype(np.int64)
    off += 8 * nmask
    docs = [d.decode() for d in body[off:].split(b"\x00")] if count else []
    if len(docs) != count:
        raise IndexFileError("delta: doc ids do not match the vectors")
    documents = h.get("documents") or []
    if documents and (
        not isinstance(documents, list)
        or len(documents) != count
        or not all(isinstance(d, list) and len(d) == 4 for d in documents)
    ):
        raise IndexFileError("delta: documents do not match the vectors")
    return Delta(
        base_version=int(h["base_version"]),
        max_seq=int(h["max_seq"]),
        model=str(h["model"]),
        dim=dim,
        ids=ids,
        vectors=vectors,
        doc_ids=docs,
        masked=masked,
        built_at=float(h["built_at"]),
        source_key=tuple(int(v) for v in h.get("source_key") or ()),
        documents=documents,
    )


# --- loading a published version -----------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    manifest: dict[str, Any]
    index: faiss.Index
    docs: DocMap
    documents: docs_format.Documents | None = None
    """Texts, metadata and filter postings (None: built before they travelled with it)."""

    @property
    def version(self) -> int:
        return int(self.manifest["version"])


def read_manifest(directory: Path, name: str = MANIFEST) -> dict[str, Any] | None:
    """The manifest (None when nothing was published). A manifest that does not parse is an
    :class:`IndexFileError` (it is replaced atomically, so that means damage, not a race)."""
    try:
        raw = (directory / name).read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise IndexFileError(f"{name}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise IndexFileError(f"{name}: not an object")
    return data


def _sha_checked(path: Path, expected: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IndexFileError(f"{path.name}: missing") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise IndexFileError(f"{path.name}: checksum mismatch (truncated or corrupt)")
    return data


def load_version(directory: Path, manifest: dict[str, Any], *, collection: str) -> Loaded:
    """Load and verify the version ``manifest`` describes: checksums of the exact bytes
    deserialised, collection, dimension, vector count, model and metric. Raises
    :class:`IndexFileError`; never returns a partial index."""
    try:
        version = int(manifest["version"])
        dim = int(manifest["dim"])
        count = int(manifest["vector_count"])
        model = str(manifest["model"])
        file_name = str(manifest["file"])
        docs_name = str(manifest["docs_file"])
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFileError(f"manifest: missing or bad field ({exc})") from None
    if manifest.get("collection") != collection:
        raise IndexFileError(f"manifest is for {manifest.get('collection')!r}, not {collection!r}")
    if manifest.get("metric") != "ip":
        raise IndexFileError(f"manifest metric {manifest.get('metric')!r} is not 'ip'")
    meta_name = manifest.get("meta_file")
    for name in (file_name, docs_name, str(meta_name or "")):
        if "/" in name or name.startswith("."):
            raise IndexFileError(f"manifest names a file outside the directory: {name!r}")
    raw = _sha_checked(directory / file_name, str(manifest.get("sha256")))
    docs_raw = _sha_checked(directory / docs_name, str(manifest.get("docs_sha256")))
    try:
        index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
    except RuntimeError as exc:
        raise IndexFileError(f"{file_name}: FAISS cannot read it ({exc})") from None
    docs = decode_docs(docs_raw)
    if index.d != dim or docs.dim != dim:
        raise IndexFileError(f"v{version}: dimension {index.d}/{docs.dim}, manifest says {dim}")
    if index.ntotal != count or len(docs.ids) != count:
        raise IndexFileError(
            f"v{version}: {index.ntotal} vectors / {len(docs.ids)} doc ids, manifest says {count}"
        )
    if docs.model != model:
        raise IndexFileError(f"v{version}: doc map model {docs.model!r}, manifest says {model!r}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexFileError(f"v{version}: index metric is not inner product")
    documents = None if meta_name is None else _load_documents(directory, manifest, count)
    probe(index, version)
    return Loaded(manifest, index, docs, documents)


def _load_documents(directory: Path, manifest: dict[str, Any], count: int) -> docs_format.Documents:
    name = str(manifest["meta_file"])
    raw = _sha_checked(directory / name, str(manifest.get("meta_sha256")))
    try:
        documents = docs_format.decode_documents(raw)
    except docs_format.DocumentsError as exc:
        raise IndexFileError(f"{name}: {exc}") from None
    if documents.count != count:
        raise IndexFileError(f"{name}: {documents.count} documents, manifest says {count}")
    return documents


def quantizer_centroids(path: Path) -> npt.NDArray[np.float32] | None:
    """The coarse quantizer's centroids of the IVF index in ``path`` (None: not an IVF index
    with a flat quantizer, or a file FAISS cannot read). The inverted lists are mapped, not
    read: this costs milliseconds on a 1.5 GB file. The file's sha256 is not checked here:
    a build that uses the centroids measures its own recall (and retrains when it is poor)."""
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        ivf = faiss.extract_index_ivf(index)
        quantizer = faiss.downcast_index(ivf.quantizer)
        if not isinstance(quantizer, faiss.IndexFlat) or quantizer.ntotal != ivf.nlist:
            return None
        out: npt.NDArray[np.float32] = quantizer.reconstruct_n(0, int(quantizer.ntotal))
        return out
    except RuntimeError:
        return None


def probe(index: faiss.Index, version: int) -> None:
    """One search on ``index`` (a unit vector, k=1): a file that deserialises and matches its
    manifest can still be unusable (an IVF index marked untrained, inverted lists that do not
    match the quantizer), and would then fail every search once served."""
    query = np.zeros((1, int(index.d)), dtype=np.float32)
    if index.d:
        query[0, 0] = 1.0
    try:
        scores, ids = index.search(query, 1)
    except Exception as exc:  # FAISS raises RuntimeError; SWIG may raise others
        raise IndexFileError(f"v{version}: probe search failed ({exc})") from None
    if ids.shape != (1, 1) or (ids[0, 0] >= 0 and not np.isfinite(scores[0, 0])):
        raise IndexFileError(f"v{version}: probe search returned garbage")
