"""Index builds against the real PostgreSQL: read, choose, publish, skip, lock, rollback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import psycopg
import pytest

from afterwrite.demo.services import Endpoints
from afterwrite.readers.index_reader import IndexReader
from afterwrite.vectorindex import files
from afterwrite.worker.index import jobs, source
from afterwrite.worker.index.lock import BUILD, LockBusy, collection_lock
from tests.index_helpers import (
    add,
    clustered_vectors,
    index_settings,
    random_unit,
    tombstone,
    upsert,
)

DIM = 32


def _model(endpoints: Endpoints, tmp_path: Path, collection: str) -> str:
    return index_settings(endpoints, tmp_path).collection_model(collection)


def test_read_vectors_returns_exactly_the_live_rows(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    model = _model(endpoints, tmp_path, "docs")
    x = random_unit(1200, DIM, seed=1)
    doc_ids = add(pg, "docs", x, model=model)
    add(pg, "other", random_unit(10, DIM), model=model)
    pg.execute("UPDATE embeddings SET deleted = true WHERE doc_id = 'd000000005'")
    upsert(pg, "docs", "weird\ttab\\back\nline", x[0], model=model)
    upsert(pg, "docs", doc_ids[2], x[9], model=model)  # a new tuple at the heap's end
    with psycopg.connect(endpoints.database_url) as conn, conn.transaction():
        source.scan_in_heap_order(conn)
        data = source.read_vectors(conn, "docs", model, DIM)
    assert len(data) == 1200  # 1200 - 1 deleted + 1 new
    assert np.all(np.diff(data.ids) > 0)  # in id order although the heap is not
    assert np.array_equal(dict(zip(data.doc_ids, data.vectors, strict=True))[doc_ids[2]], x[9])
    by_doc = dict(zip(data.doc_ids, data.vectors, strict=True))
    assert "d000000005" not in by_doc
    assert np.array_equal(by_doc[doc_ids[7]], x[7])
    assert np.array_equal(by_doc["weird\ttab\\back\nline"], x[0])


def test_rebuild_publishes_a_verified_version_and_records_it(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path)
    model = settings.collection_model("docs")
    x = random_unit(2000, DIM, seed=2)
    doc_ids = add(pg, "docs", x, model=model)
    stages: list[str] = []
    report = jobs.rebuild(settings, "docs", progress=lambda s, d, t: stages.append(s))
    assert report["status"] == "published", report
    assert report["version"] == 1
    assert report["index_type"] == "IDMap2,Flat"
    assert report["recall_at_10"] == 1.0
    assert {"read", "build", "write"} <= set(stages)

    manifest = json.loads((tmp_path / "docs" / "manifest.json").read_text())
    for key in ("collection", "version", "vector_count", "model", "dim", "index_type", "metric",
                "sha256", "file", "built_at", "max_seq", "recall_at_10", "timings"):  # fmt: skip
        assert key in manifest
    assert manifest["vector_count"] == 2000
    assert manifest["dim"] == DIM
    assert set(manifest["timings"]) == {"read_s", "build_s", "write_s"}
    assert not [p for p in (tmp_path / "docs").iterdir() if p.name.startswith(".tmp-")]

    reader = IndexReader("docs", tmp_path)
    assert reader.version == 1
    hits = reader.search(x[42], k=5)
    assert hits[0][0] == doc_ids[42]
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)

    row = pg.execute(
        "SELECT status, version, vector_count, read_s, build_s, write_s, recall_at_10"
        " FROM index_builds WHERE collection = 'docs' AND kind = 'build'"
    ).fetchone()
    assert row is not None
    assert row[:3] == ("published", 1, 2000)
    assert all(v is not None and v >= 0 for v in row[3:6])


def test_unchanged_collection_is_skipped_and_a_change_rebuilds(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path)
    model = settings.collection_model("docs")
    add(pg, "docs", random_unit(100, DIM), model=model)
    assert jobs.rebuild(settings, "docs")["status"] == "published"
    again = jobs.rebuild(settings, "docs")
    assert again["skipped"]
    assert "unchanged" in again["why"]
    assert jobs.rebuild_changed(settings) == []
    upsert(pg, "docs", "new", random_unit(1, DIM, seed=9)[0], model=model)
    reports = jobs.rebuild_changed(settings)
    assert [(r["collection"], r["status"], r["version"]) for r in reports] == [
        ("docs", "published", 2)
    ]


def test_mixed_models_are_not_built_and_the_old_version_stays(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path)
    model = settings.collection_model("docs")
    add(pg, "docs", random_unit(100, DIM), model=model)
    assert jobs.rebuild(settings, "docs")["version"] == 1
    add(pg, "docs", random_unit(5, 16), model="new-model", prefix="n")
    report = jobs.rebuild(settings, "docs", force=True)
    assert report["skipped"]
    assert "re-embedding" in report["why"]
    assert "new-model" in report["why"]
    assert json.loads((tmp_path / "docs" / "manifest.json").read_text())["version"] == 1
    status = pg.execute(
        "SELECT status, detail FROM index_builds WHERE collection = 'docs' ORDER BY id DESC"
    ).fetchone()
    assert status is not None
    assert status[0] == "skipped"
    assert "new-model" in status[1]


def test_one_builder_per_collection(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path)
    add(pg, "docs", random_unit(100, DIM), model=settings.collection_model("docs"))
    with collection_lock(endpoints.database_url, BUILD, "docs"):
        report = jobs.rebuild(settings, "docs", force=True)
        assert report["skipped"]
        assert "another build" in report["why"]
        with pytest.raises(LockBusy), collection_lock(endpoints.database_url, BUILD, "docs"):
            pass
    # the lock died with its holder's session: free again
    assert jobs.rebuild(settings, "docs", force=True)["status"] == "published"


def test_ivf_choice_has_recall_at_least_095(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path, index_exact_max_vectors=5_000)
    model = settings.collection_model("big")
    x = clustered_vectors(40_000, 64, clusters=50, seed=3)
    add(pg, "big", x, model=model)
    report = jobs.rebuild(settings, "big")
    assert report["status"] == "published", report
    assert report["index_type"].startswith("IVF")
    assert report["recall_at_10"] >= 0.95
    # independently of the build's own measurement: fresh queries against exact search
    reader = IndexReader("big", tmp_path)
    rng = np.random.default_rng(11)
    q = x[rng.choice(len(x), 100, replace=False)] + rng.standard_normal((100, 64)).astype(
        np.float32
    ) * (0.5 / 8)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    hits = 0
    for i in range(len(q)):
        found = {d for d, _ in reader.search(q[i], 10)}
        hits += len(found & {f"d{j:09d}" for j in exact[i]})
    assert hits / 1000 >= 0.95


def test_recall_floor_refuses_to_publish(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(
        endpoints,
        tmp_path,
        index_factory={"docs": "IVF16,PQ2x4"},
        index_recall_floor=0.99,
    )
    add(pg, "docs", random_unit(3000, DIM, seed=4), model=settings.collection_model("docs"))
    report = jobs.rebuild(settings, "docs")
    assert report["status"] == "rejected", report
    assert report["recall_at_10"] < 0.99
    assert not (tmp_path / "docs" / "manifest.json").exists()
    assert files.versions_on_disk(tmp_path / "docs") == []


def test_keep_versions_and_rollback(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path, index_keep_versions=2)
    model = settings.collection_model("docs")
    add(pg, "docs", random_unit(50, DIM), model=model)
    for _ in range(4):
        assert jobs.rebuild(settings, "docs", force=True)["status"] == "published"
    directory = tmp_path / "docs"
    assert files.versions_on_disk(directory) == [3, 4]
    manifest = jobs.rollback(settings, "docs")
    assert manifest["version"] == 3
    assert manifest["pinned"]
    assert IndexReader("docs", tmp_path).version == 3
    upsert(pg, "docs", "later", random_unit(1, DIM, seed=5)[0], model=model)
    assert jobs.rebuild_changed(settings) == []  # pinned: beat leaves it alone
    assert jobs.rebuild(settings, "docs")["why"].startswith("pinned")
    report = jobs.rebuild(settings, "docs", force=True)
    assert report["version"] == 5  # never reuses a number
    with pytest.raises(ValueError, match="not kept"):
        jobs.rollback(settings, "docs", to=1)


def test_a_rebuild_reuses_the_published_quantizer_until_the_collection_doubles(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path, index_exact_max_vectors=5_000)
    model = settings.collection_model("big")
    x = clustered_vectors(30_000, 64, clusters=50, seed=12)
    add(pg, "big", x[:20_000], model=model)
    first = jobs.rebuild(settings, "big")
    assert first["status"] == "published", first
    assert first["quantizer_from"] is None
    assert first["timings"]["train_s"] > 0

    add(pg, "big", x[20_000:], model=model, start=20_000)  # 1.5x: same clusters still fit
    pg.execute("UPDATE embeddings SET deleted = true WHERE doc_id = 'd000000003'")
    second = jobs.rebuild(settings, "big")
    assert second["status"] == "published", second
    assert second["index_type"] == first["index_type"]
    assert second["quantizer_from"] == first["version"]
    assert second["retrained"] is None
    assert second["recall_at_10"] >= 0.95
    manifest = files.read_manifest(tmp_path / "big")
    assert manifest is not None
    assert manifest["quantizer_from"] == first["version"]
    reader = IndexReader("big", tmp_path)
    assert reader.search(x[25_000], 1)[0][0] == "d000025000"  # added after the first build
    assert "d000000003" not in {d for d, _ in reader.search(x[3], 10)}  # deleted since

    add(pg, "big", clustered_vectors(40_000, 64, clusters=50, seed=13), model=model,
        start=30_000)  # fmt: skip
    third = jobs.rebuild(settings, "big")  # 70,000 > 2 x 30,000: trained afresh
    assert third["status"] == "published", third
    assert third["quantizer_from"] is None


def test_the_published_quantizer_is_reused_only_for_the_same_model_dim_and_index(
    tmp_path: Path,
) -> None:
    from afterwrite.vectorindex.build import build_index
    from afterwrite.vectorindex.choose import Choice

    x = random_unit(4000, DIM, seed=14)
    choice = Choice("IVF32,Flat", "t", 32)
    built = build_index(choice, np.arange(4000, dtype=np.int64), x)
    files.write_index_atomic(tmp_path / files.index_file(3), built.index)
    current = {"version": 3, "vector_count": 4000, "model": "m", "dim": DIM,
               "index_type": "IVF32,Flat", "file": files.index_file(3)}  # fmt: skip

    def prior(manifest: dict[str, Any] | None, n: int = 5000, model: str = "m", dim: int = DIM,
              c: Choice = choice) -> int | None:  # fmt: skip
        centroids, version = jobs._prior_quantizer(tmp_path, manifest, model, dim, n, c)
        assert (centroids is None) == (version is None)
        return version

    assert prior(current) == 3
    assert prior(current, n=2100) == 3
    assert prior(current, model="other") is None  # re-embedded: other vectors entirely
    assert prior(current, dim=DIM * 2) is None
    assert prior(current, n=8000) is None  # doubled
    assert prior(current, n=2000) is None  # halved
    assert prior(current, c=Choice("IVF64,Flat", "t", 64)) is None
    assert prior(current, c=Choice("IDMap2,Flat", "t")) is None
    assert prior(None) is None
    assert prior({**current, "file": "../elsewhere.faiss"}) is None
    assert prior({**current, "file": files.index_file(9)}) is None  # pruned / missing


def test_a_reused_quantizer_that_fits_badly_is_retrained() -> None:
    from afterwrite.vectorindex.build import Built

    def built(recall: float, nprobe: int) -> Built:
        return Built(
            faiss.IndexFlatIP(4), "IVF32,Flat", recall, {"nprobe": nprobe}, reused_quantizer=True
        )

    current = {"search_params": {"nprobe": 8}}
    assert jobs._reuse_rejected(built(0.97, 16), current, 0.9) is None
    assert "below" in str(jobs._reuse_rejected(built(0.85, 8), current, 0.9))
    assert "nprobe 32" in str(jobs._reuse_rejected(built(0.97, 32), current, 0.9))
    assert jobs._reuse_rejected(built(0.97, 32), {}, 0.9) is None


def test_rows_committed_between_the_documents_and_the_vectors_are_in_neither(
    endpoints: Endpoints,
    pg: psycopg.Connection[Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = index_settings(endpoints, tmp_path)
    model = settings.collection_model("docs")
    x = random_unit(300, DIM, seed=15)
    doc_ids = add(pg, "docs", x[:200], model=model)
    read_vectors = source.read_vectors
    moved = random_unit(1, DIM, seed=16)[0]

    def commit_more_first(*args: Any, **kwargs: Any) -> source.Vectors:
        # another writer commits after the documents were read, before the vectors are
        add(pg, "docs", x[200:], model=model, start=200)
        upsert(pg, "docs", doc_ids[0], moved, model=model)
        tombstone(pg, "docs", doc_ids[1])
        return read_vectors(*args, **kwargs)

    monkeypatch.setattr(source, "read_vectors", commit_more_first)
    report = jobs.rebuild(settings, "docs")
    assert report["status"] == "published", report
    # the version holds the snapshot's rows: documents, doc ids and vectors alike
    assert report["vector_count"] == 200
    manifest = files.read_manifest(tmp_path / "docs")
    assert manifest is not None
    loaded = files.load_version(tmp_path / "docs", manifest, collection="docs")
    assert loaded.documents is not None
    assert loaded.documents.count == len(loaded.docs.ids) == loaded.index.ntotal == 200
    # and what committed meanwhile is served from the version's delta: nothing is lost
    reader = IndexReader("docs", tmp_path)
    assert reader.search(moved, 1)[0].doc_id == doc_ids[0]
    assert reader.search(x[220], 1)[0].doc_id == "d000000220"
    assert doc_ids[1] not in {d for d, _ in reader.search(x[1], 10)}
