"""IndexReader against published versions: freshness deltas, damaged files, text queries."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import stat
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import psycopg
import pytest

from afterwrite.demo.services import Endpoints
from afterwrite.readers.index_reader import IndexReader, IndexUnavailable
from afterwrite.vectorindex import files
from afterwrite.vectorindex.documents import DocumentsBuilder
from afterwrite.worker.index import jobs, publish
from tests.index_helpers import add, index_settings, random_unit, tombstone, upsert

DIM = 32


def test_freshness_new_document_found_deleted_one_gone(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path)
    model = settings.collection_model("docs")
    x = random_unit(500, DIM, seed=1)
    doc_ids = add(pg, "docs", x, model=model)
    jobs.rebuild(settings, "docs")
    reader = IndexReader("docs", tmp_path, check_interval_s=0.0)
    assert reader.search(x[3], 1)[0][0] == doc_ids[3]

    fresh = random_unit(1, DIM, seed=99)[0]
    upsert(pg, "docs", "fresh", fresh, model=model)  # embedded after the build
    tombstone(pg, "docs", doc_ids[3])  # deleted after the build
    moved = random_unit(1, DIM, seed=7)[0]
    upsert(pg, "docs", doc_ids[4], moved, model=model)  # changed after the build
    assert jobs.refresh_deltas(settings)[0]["published"]
    assert jobs.refresh_deltas(settings)[0]["why"] == "unchanged"  # cheap when idle
    assert reader.reload()
    assert reader.version == 1  # same build, new delta

    [(doc, score)] = reader.search(fresh, 1)
    assert doc == "fresh"
    assert score == pytest.approx(1.0, abs=1e-5)
    assert doc_ids[3] not in {d for d, _ in reader.search(x[3], 50)}
    hits = [d for d, _ in reader.search(moved, 500)]
    assert hits[0] == doc_ids[4]
    assert len(hits) == len(set(hits)) == 500  # changed doc once; every doc at most once
    assert doc_ids[4] not in [d for d, _ in reader.search(x[4], 3)][1:]

    # the delta is recorded: freshness can be measured from index_builds
    row = pg.execute(
        "SELECT max(max_seq) FROM index_builds WHERE collection = 'docs' AND kind = 'delta'"
        " AND status = 'published'"
    ).fetchone()
    seq = pg.execute("SELECT seq FROM embeddings WHERE doc_id = 'fresh'").fetchone()
    assert row is not None
    assert seq is not None
    assert row[0] >= seq[0]

    # the next build folds the changes in; the new version's delta starts empty
    report = jobs.rebuild(settings, "docs")
    assert report["version"] == 2
    assert report["vector_count"] == 500
    assert reader.reload()
    assert reader.version == 2
    assert reader.search(fresh, 1)[0][0] == "fresh"
    assert doc_ids[3] not in {d for d, _ in reader.search(x[3], 50)}


def test_corrupt_or_truncated_version_is_rejected_old_keeps_serving(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path)
    x = random_unit(300, DIM, seed=2)
    doc_ids = add(pg, "docs", x, model=settings.collection_model("docs"))
    jobs.rebuild(settings, "docs")
    reader = IndexReader("docs", tmp_path, check_interval_s=0.0)
    assert reader.version == 1

    for damage in ("flip", "truncate"):
        report = jobs.rebuild(settings, "docs", force=True)
        path = tmp_path / "docs" / files.index_file(report["version"])
        data = bytearray(path.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0xFF
        else:
            del data[len(data) // 3 :]
        path.write_bytes(bytes(data))
        assert not reader.reload()
        assert reader.version == 1
        assert reader.search(x[9], 1)[0][0] == doc_ids[9]
        # a fresh reader (another process starting now) refuses it too
        with pytest.raises(IndexUnavailable):
            IndexReader("docs", tmp_path).search(x[9], 1)

    report = jobs.rebuild(settings, "docs", force=True)
    assert reader.reload()
    assert reader.version == report["version"]


def test_published_files_are_private_and_a_forged_delta_is_not_served(
    endpoints: Endpoints,
    pg: psycopg.Connection[Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = index_settings(endpoints, tmp_path)
    model = settings.collection_model("docs")
    x = random_unit(200, DIM, seed=4)
    doc_ids = add(pg, "docs", x, model=model)
    old = os.umask(0o022)
    try:
        jobs.rebuild(settings, "docs")
        upsert(pg, "docs", "fresh", random_unit(1, DIM, seed=41)[0], model=model)
        assert jobs.refresh_deltas(settings)[0]["published"]
    finally:
        os.umask(old)
    directory = tmp_path / "docs"
    names = sorted(p.name for p in directory.iterdir())
    assert files.delta_file(1) in names
    for name in names:
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    manifest = files.read_manifest(directory)
    assert manifest is not None
    assert (
        manifest["delta_sha256"]
        == hashlib.sha256((directory / files.delta_file(1)).read_bytes()).hexdigest()
    )

    reader = IndexReader("docs", tmp_path, check_interval_s=0.0)
    assert "fresh" in {d for d, _ in reader.search(x[0], 300)}

    # someone with write access to the directory plants a delta of their own: a valid file
    # (its internal checksum is right) that hides doc 0 and serves "planted" first
    m = manifest
    forged = files.Delta(
        base_version=1, max_seq=int(m["max_seq"]) + 1, model=str(m["model"]), dim=DIM,
        ids=np.array([10**12], dtype=np.int64), vectors=x[:1].copy(), doc_ids=["planted"],
        masked=np.empty(0, dtype=np.int64), built_at=0.0,
    )  # fmt: skip
    (directory / files.delta_file(1)).write_bytes(
        b"".join(bytes(p) for p in files.encode_delta(forged))
    )
    reader.reload()
    hits = [d for d, _ in reader.search(x[0], 300)]
    assert "planted" not in hits
    assert hits[0] == doc_ids[0]
    assert "fresh" in hits  # the bound delta it had keeps serving
    assert "delta_sha256" in caplog.text
    fresh = IndexReader("docs", tmp_path)  # a process starting now does not serve it either
    assert "planted" not in {d for d, _ in fresh.search(x[0], 300)}
    # nor does the worker take it for the current delta: the next refresh replaces it
    assert jobs.refresh_deltas(settings)[0]["published"]
    assert reader.reload()
    assert "fresh" in {d for d, _ in reader.search(x[0], 300)}


def test_a_version_that_fails_a_probe_search_is_not_swapped_in(
    endpoints: Endpoints,
    pg: psycopg.Connection[Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = index_settings(endpoints, tmp_path)
    x = random_unit(300, DIM, seed=5)
    doc_ids = add(pg, "docs", x, model=settings.collection_model("docs"))
    jobs.rebuild(settings, "docs")
    reader = IndexReader("docs", tmp_path, check_interval_s=0.0)
    directory = tmp_path / "docs"
    v1 = files.read_manifest(directory)
    assert v1 is not None
    docs = files.load_version(directory, v1, collection="docs").docs

    # v2: every checksum, count, dimension and metric right, but an IVF index marked untrained
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, 4, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    broken = faiss.IndexIDMap2(ivf)
    broken.add_with_ids(x, docs.ids)
    ivf.is_trained = False
    no_text = DocumentsBuilder(0, 0)
    for _ in docs.doc_ids:
        no_text.add(None, None)
    sha, docs_sha, meta_sha, size = publish.write_version(
        directory, 2, broken, docs.ids, [d.decode() for d in docs.doc_ids], model=v1["model"],
        documents=no_text,
    )  # fmt: skip
    v2 = {
        **v1,
        "version": 2,
        "file": files.index_file(2),
        "docs_file": files.docs_file(2),
        "meta_file": files.meta_file(2),
        "sha256": sha,
        "docs_sha256": docs_sha,
        "meta_sha256": meta_sha,
        "file_bytes": size,
    }
    v2.pop("delta_sha256", None)
    publish.publish_manifest(directory, v2)

    assert not reader.reload()
    assert reader.version == 1
    assert reader.search(x[7], 1)[0][0] == doc_ids[7]
    assert "probe search failed" in caplog.text
    with pytest.raises(IndexUnavailable):
        IndexReader("docs", tmp_path).search(x[7], 1)
    with pytest.raises(files.IndexFileError, match="probe"):
        publish.rollback(directory, "docs", to=2)


def test_search_checks_for_new_versions_by_itself(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path)
    add(pg, "docs", random_unit(100, DIM), model=settings.collection_model("docs"))
    jobs.rebuild(settings, "docs")
    reader = IndexReader("docs", tmp_path, check_interval_s=0.05)
    jobs.rebuild(settings, "docs", force=True)
    q = random_unit(1, DIM, seed=3)[0]
    deadline = 200
    while reader.version != 2 and deadline:
        reader.search(q, 3)
        deadline -= 1
        reader.close()
    assert reader.version == 2


def test_wrong_dimension_and_missing_index(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    with pytest.raises(IndexUnavailable):
        IndexReader("docs", tmp_path).search(np.ones(DIM, dtype=np.float32))
    settings = index_settings(endpoints, tmp_path)
    add(pg, "docs", random_unit(10, DIM), model=settings.collection_model("docs"))
    jobs.rebuild(settings, "docs")
    with pytest.raises(ValueError, match="dimension"):
        IndexReader("docs", tmp_path).search(np.ones(DIM + 1, dtype=np.float32))


@pytest.mark.skipif(
    importlib.util.find_spec("afterwrite.embedders.providers") is None,
    reason="the embedding providers module is not there yet",
)
def test_text_query_is_embedded_with_the_index_model(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    from afterwrite.embedders.providers import make_embedder

    settings = index_settings(endpoints, tmp_path)
    model = settings.collection_model("docs")
    texts = ["the cat sat on the mat", "stock markets fell sharply", "a recipe for pancakes"]
    try:
        result = make_embedder(settings, model).embed_many(texts)
    except Exception as exc:  # the offline model may be unavailable on this machine
        pytest.skip(f"embedder unavailable: {exc}")
    vectors = np.stack([result.vectors[i] for i in range(3)]).astype(np.float32)
    for i, vec in enumerate(vectors):
        upsert(pg, "docs", f"t{i}", vec, model=model)
    jobs.rebuild(settings, "docs")
    reader = IndexReader("docs", tmp_path, settings=settings)
    assert reader.search("pancake recipe", 1)[0][0] == "t2"


def test_during_a_model_change_re_embedded_documents_stay_searchable(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path)
    model = settings.collection_model("docs")
    x = random_unit(200, DIM, seed=3)
    doc_ids = add(pg, "docs", x, model=model)
    jobs.rebuild(settings, "docs")
    reader = IndexReader("docs", tmp_path, check_interval_s=0.0)

    # `afterwrite embeddings reembed` has moved one document to the new model (another
    # dimension): until the whole collection is re-embedded and rebuilt, the index serves its
    # old vector rather than losing it
    upsert(pg, "docs", doc_ids[5], random_unit(1, DIM * 2, seed=4)[0], model="new-model")
    jobs.refresh_deltas(settings)
    reader.reload()
    assert reader.search(x[5], 1)[0][0] == doc_ids[5]
    assert jobs.rebuild(settings, "docs")["status"] == "skipped"  # no index mixes models
