"""Pure parts of the index lifecycle: index choice, COPY parsing, file formats, recall."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from afterwrite.vectorindex import files
from afterwrite.vectorindex.build import build_index, recall
from afterwrite.vectorindex.choose import Choice, choose_index, ivf_nlist
from afterwrite.worker.index.source import (
    COPY_SIGNATURE,
    BinaryRowParser,
    SourceError,
    parse_id_text,
)


def _copy_stream(ids: list[int], vectors: np.ndarray) -> bytes:
    out = bytearray(COPY_SIGNATURE + struct.pack(">ii", 0, 0))
    for i, v in zip(ids, vectors, strict=True):
        blob = v.astype("<f4").tobytes()
        out += struct.pack(">hiqi", 2, 8, i, len(blob)) + blob
    return bytes(out + struct.pack(">h", -1))


@pytest.mark.parametrize("piece", [1, 7, 100, 1 << 20])
def test_binary_copy_parser_in_any_chunking(piece: int) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 8)).astype(np.float32)
    ids = [10 * i + 3 for i in range(50)]
    data = _copy_stream(ids, vectors)
    parser = BinaryRowParser(8, 50)
    for start in range(0, len(data), piece):
        parser.feed(data[start : start + piece])
    got_ids, got = parser.finish()
    assert got_ids.tolist() == ids
    assert np.array_equal(got, vectors)


def test_binary_copy_parser_rejects_wrong_width_and_truncation() -> None:
    vectors = np.ones((3, 8), dtype=np.float32)
    data = _copy_stream([1, 2, 3], vectors)
    parser = BinaryRowParser(4, 3)  # rows are 8 wide, the parser expects 4
    parser.feed(data)
    with pytest.raises(SourceError):
        parser.finish()
    truncated = BinaryRowParser(8, 3)
    truncated.feed(data[:-10])
    with pytest.raises(SourceError):
        truncated.finish()


def test_text_copy_doc_ids_are_unescaped() -> None:
    data = b"1\tplain\n2\ttab\\there\n3\tback\\\\slash\n4\tnew\\nline\n"
    docs, ids = parse_id_text(data)
    assert docs == ["plain", "tab\there", "back\\slash", "new\nline"]
    assert ids.tolist() == [1, 2, 3, 4]


def test_choice_by_size_and_budget() -> None:
    kw: dict[str, Any] = {"exact_max_vectors": 50_000, "memory_budget_mb": 4096}
    assert choose_index(10_000, 384, **kw).factory == "IDMap2,Flat"
    ivf = choose_index(1_000_000, 384, **kw)
    assert ivf.factory == "IVF1024,Flat"
    assert ivf.nlist == 1024
    assert choose_index(
        1_000_000, 384, exact_max_vectors=50_000, memory_budget_mb=1024
    ).factory == ("IVF1024,SQ8")
    assert (
        "PQ"
        in choose_index(10_000_000, 384, exact_max_vectors=50_000, memory_budget_mb=1024).factory
    )
    assert "HNSW" in choose_index(1_000_000, 384, **kw, latency_budget_ms=0.5).factory
    assert choose_index(10, 8, **kw, override="IVF4,Flat") == Choice(
        "IVF4,Flat", "factory override (AFTERWRITE_INDEX_FACTORY)", 4
    )
    assert ivf_nlist(2_000) * 39 <= 2_000


def test_recall_counts_overlap() -> None:
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall(truth, truth) == 1.0
    assert recall(np.array([[1, 2, 0, 0], [5, 6, 7, 8]]), truth) == 0.75


def test_every_index_type_keeps_ids_and_round_trips() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(1000, 4000, dtype=np.int64)
    for factory, nlist in (("IDMap2,Flat", None), ("IVF32,Flat", 32), ("HNSW16", None)):
        built = build_index(Choice(factory, "t", nlist), ids, x)
        assert built.recall_at_10 is not None
        assert built.recall_at_10 >= 0.95
        again = faiss.deserialize_index(faiss.serialize_index(built.index))
        _, found = again.search(x[:5], 1)
        assert found[:, 0].tolist() == ids[:5].tolist()


def test_docs_and_delta_formats_round_trip_and_detect_damage() -> None:
    ids = np.array([3, 9, 12], dtype=np.int64)
    raw = b"".join(bytes(p) for p in files.encode_docs(ids, ["a", "b\tc", "ü"], model="m", dim=4))
    docs = files.decode_docs(raw)
    assert docs.lookup(np.array([9, 12, 4, -1])) == ["b\tc", "ü", None, None]
    with pytest.raises(files.IndexFileError):
        files.decode_docs(raw[:20])
    delta = files.Delta(
        base_version=2, max_seq=77, model="m", dim=4, ids=ids[:1],
        vectors=np.ones((1, 4), dtype=np.float32), doc_ids=["x"], masked=ids, built_at=1.0,
    )  # fmt: skip
    blob = b"".join(bytes(p) for p in files.encode_delta(delta))
    back = files.decode_delta(blob)
    assert (back.base_version, back.max_seq, back.doc_ids) == (2, 77, ["x"])
    assert back.masked.tolist() == [3, 9, 12]
    damaged = bytearray(blob)
    damaged[-3] ^= 1
    with pytest.raises(files.IndexFileError, match="checksum"):
        files.decode_delta(bytes(damaged))


def test_write_atomic_leaves_no_temporary(tmp_path: Path) -> None:
    sha = files.write_atomic(tmp_path / "f", [b"hello ", b"world"])
    assert (tmp_path / "f").read_bytes() == b"hello world"
    assert sha == "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_written_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        files.write_atomic(tmp_path / "v00000001.faiss", [b"index"])
        files.write_json_atomic(tmp_path / files.MANIFEST, {"version": 1})
    finally:
        os.umask(old)
    for name in ("v00000001.faiss", files.MANIFEST):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


def test_a_delta_is_served_only_when_the_manifest_binds_its_hash() -> None:
    import hashlib

    delta = files.Delta(
        base_version=1, max_seq=5, model="m", dim=2, ids=np.array([7], dtype=np.int64),
        vectors=np.ones((1, 2), dtype=np.float32), doc_ids=["x"],
        masked=np.empty(0, dtype=np.int64), built_at=1.0,
    )  # fmt: skip
    blob = b"".join(bytes(p) for p in files.encode_delta(delta))
    sha = hashlib.sha256(blob).hexdigest()
    bound = files.bound_delta(blob, {"version": 1, "delta_sha256": sha})
    assert bound is not None
    assert bound.doc_ids == ["x"]
    assert files.bound_delta(blob, {"version": 1}) is None  # nothing bound: nothing served
    forged = b"".join(bytes(p) for p in files.encode_delta(
        files.Delta(**{**delta.__dict__, "doc_ids": ["forged"]})
    ))  # fmt: skip
    files.decode_delta(forged)  # internally consistent: its own checksum is right
    with pytest.raises(files.IndexFileError, match="delta_sha256"):
        files.bound_delta(forged, {"version": 1, "delta_sha256": sha})


def test_a_version_that_cannot_search_fails_the_probe() -> None:
    dim = 8
    x = np.random.default_rng(0).standard_normal((200, dim)).astype(np.float32)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, 4, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    index = faiss.IndexIDMap2(ivf)
    index.add_with_ids(x, np.arange(200, dtype=np.int64))
    files.probe(index, 1)
    ivf.is_trained = False  # deserialises fine; every search raises
    broken = faiss.deserialize_index(faiss.serialize_index(index))
    with pytest.raises(files.IndexFileError, match="probe search failed"):
        files.probe(broken, 2)


def test_cleanup_spares_a_delta_being_written_and_removes_a_dead_builders_files(
    tmp_path: Path,
) -> None:
    import os
    import time

    dead_build = tmp_path / f"{files.TMP_PREFIX}{files.index_file(3)}.abc"
    live_delta = tmp_path / f"{files.TMP_PREFIX}{files.delta_file(2)}.def"
    old_delta = tmp_path / f"{files.TMP_PREFIX}{files.delta_file(1)}.ghi"
    for p in (dead_build, live_delta, old_delta):
        p.write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    os.utime(old_delta, (an_hour_ago, an_hour_ago))

    assert files.remove_temporaries(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == [live_delta.name]


def test_a_version_without_its_manifest_copy_is_not_a_version(tmp_path: Path) -> None:
    for v in (1, 2):
        (tmp_path / files.index_file(v)).write_bytes(b"i")
        (tmp_path / files.docs_file(v)).write_bytes(b"d")
    (tmp_path / files.version_manifest_file(1)).write_text("{}")
    # v2: its build lost the race for the delta lock before writing the manifest copy
    assert files.versions_on_disk(tmp_path) == [1]
    assert files.incomplete_versions(tmp_path) == [2]


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def test_an_index_file_is_streamed_in_faiss_format_with_its_sha256(tmp_path: Path) -> None:
    import hashlib

    x = _unit(3000, 16, seed=2)
    built = build_index(Choice("IVF32,Flat", "t", 32), np.arange(3000, dtype=np.int64), x)
    seen: list[tuple[int, int]] = []
    sha, size = files.write_index_atomic(
        tmp_path / "v00000001.faiss", built.index, progress=lambda d, t: seen.append((d, t))
    )
    data = (tmp_path / "v00000001.faiss").read_bytes()
    assert data == faiss.serialize_index(built.index).tobytes()
    assert sha == hashlib.sha256(data).hexdigest()
    assert size == len(data)
    assert seen[-1][0] == size
    assert all(done <= total for done, total in seen)
    assert [p.name for p in tmp_path.iterdir()] == ["v00000001.faiss"]


def test_a_failed_index_write_leaves_nothing_and_stops_the_serialisation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    x = _unit(3000, 16, seed=3)
    built = build_index(Choice("IVF32,Flat", "t", 32), np.arange(3000, dtype=np.int64), x)
    monkeypatch.setattr(files, "WRITE_CHUNK_BYTES", 1024)

    def disk_full(done: int, total: int) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_index_atomic(tmp_path / "v00000001.faiss", built.index, progress=disk_full)
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name == "afterwrite-index-write"]


def test_a_reused_quantizer_builds_the_same_index_without_training(tmp_path: Path) -> None:
    x = _unit(4000, 16, seed=4)
    ids = np.arange(10, 4010, dtype=np.int64)
    choice = Choice("IVF32,Flat", "t", 32)
    first = build_index(choice, ids, x)
    files.write_index_atomic(tmp_path / "v00000001.faiss", first.index)
    centroids = files.quantizer_centroids(tmp_path / "v00000001.faiss")
    assert centroids is not None
    assert centroids.shape == (32, 16)

    again = build_index(choice, ids, x, centroids=centroids)
    assert again.reused_quantizer
    assert not first.reused_quantizer
    assert again.recall_at_10 == first.recall_at_10
    assert again.params == first.params
    q = _unit(20, 16, seed=5)
    assert np.array_equal(again.index.search(q, 10)[1], first.index.search(q, 10)[1])
    # more vectors than the centroids were trained on: still every vector, exact on itself
    more = np.concatenate([x, _unit(2000, 16, seed=6)])
    grown = build_index(choice, np.arange(6000, dtype=np.int64), more, centroids=centroids)
    assert grown.reused_quantizer
    assert grown.index.ntotal == 6000
    assert grown.recall_at_10 is not None
    assert grown.recall_at_10 >= 0.95


def test_centroids_that_do_not_fit_are_ignored_and_the_index_is_trained(tmp_path: Path) -> None:
    x = _unit(3000, 16, seed=7)
    ids = np.arange(3000, dtype=np.int64)
    centroids = _unit(32, 16, seed=8)
    for factory, nlist, given in (
        ("IVF64,Flat", 64, centroids),  # another number of lists
        ("IVF32,Flat", 32, np.full((32, 16), np.nan, dtype=np.float32)),
        ("IVF32,PQ4", 32, centroids),  # PQ codes need training too
        ("IDMap2,Flat", None, centroids),
    ):
        built = build_index(Choice(factory, "t", nlist), ids, x, centroids=given)
        assert not built.reused_quantizer, factory
        assert built.index.is_trained
    flat = build_index(Choice("IDMap2,Flat", "t"), ids, x)
    files.write_index_atomic(tmp_path / "flat.faiss", flat.index)
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    assert files.quantizer_centroids(tmp_path / "flat.faiss") is None
    assert files.quantizer_centroids(tmp_path / "junk.faiss") is None
    assert files.quantizer_centroids(tmp_path / "missing.faiss") is None
