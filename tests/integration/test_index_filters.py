"""Search that returns documents, with metadata filters: exact top-k at every selectivity,
deletions, documents that survive rebuilds and deltas, bad filters, size caps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
import pytest

from afterwrite.demo.services import Endpoints
from afterwrite.readers.index_reader import IndexReader
from afterwrite.vectorindex import files
from afterwrite.worker.index import jobs
from benchmarks.index import set_documents
from tests.index_helpers import add, index_settings, random_unit, tombstone, upsert

DIM = 32
N = 20_000
K = 10


def _meta(i: int) -> dict[str, Any]:
    """50 %: ``half``; 1 %: ``pct``; 0.1 %: ``permille``; ``lang`` over three values."""
    return {
        "half": i % 2 == 0,
        "pct": i % 100,
        "permille": f"p{i % 1000}",
        "lang": ["en", "de", "fr"][i % 3],
        "tags": ["not", "filterable"],
    }


def _brute(
    x: npt.NDArray[np.float32], q: npt.NDArray[np.float32], keep: list[bool], k: int
) -> list[int]:
    idx = np.flatnonzero(np.asarray(keep))
    scores = x[idx] @ q
    return [int(idx[j]) for j in np.argsort(-scores, kind="stable")[:k]]


def _corpus(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path, **overrides: Any
) -> tuple[Any, npt.NDArray[np.float32], list[str]]:
    settings = index_settings(endpoints, tmp_path, **overrides)
    x = random_unit(N, DIM, seed=11)
    doc_ids = add(pg, "docs", x, model=settings.collection_model("docs"))
    set_documents(
        pg, "docs", doc_ids, [f"text of {i}" for i in range(N)], [_meta(i) for i in range(N)]
    )
    report = jobs.rebuild(settings, "docs")
    assert report["status"] == "published", report
    return settings, x, doc_ids


FILTERS: list[tuple[dict[str, Any], Any]] = [
    ({"half": True}, lambda m: m["half"]),  # 50 %
    ({"pct": 7}, lambda m: m["pct"] == 7),  # 1 %
    ({"permille": "p7"}, lambda m: m["permille"] == "p7"),  # 0.1 %
    (
        {"lang": ["en", "de", "en"], "pct": [3, 4]},
        lambda m: m["lang"] != "fr" and m["pct"] in (3, 4),
    ),
    ({"half": False, "permille": "p8"}, lambda m: False),  # p8 is always even: none
]


@pytest.mark.parametrize("factory", [None, "IVF64,Flat", "HNSW32"])
def test_filters_give_the_exact_top_k_among_matching_documents(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path, factory: str | None
) -> None:
    overrides = {"index_factory": {"docs": factory}} if factory else {}
    _, x, doc_ids = _corpus(endpoints, pg, tmp_path, **overrides)
    reader = IndexReader("docs", tmp_path)
    assert reader.filter_keys == {"half": N, "lang": N, "pct": N, "permille": N}
    metas = [_meta(i) for i in range(N)]
    queries = random_unit(20, DIM, seed=5)
    for where, pred in FILTERS:
        if factory and where == {"half": True}:
            continue  # the broad path is as exact as the index itself: IVF, HNSW approximate
        keep = [bool(pred(m)) for m in metas]
        for q in queries:
            hits = reader.search(q, K, where=where)
            truth = _brute(x, q, keep, K)
            assert [h.doc_id for h in hits] == [doc_ids[i] for i in truth], where
            assert len(hits) == min(K, sum(keep))
            for h, i in zip(hits, truth, strict=True):
                assert h.score == pytest.approx(float(x[i] @ q), abs=1e-5)
                assert h.text == f"text of {i}"
                assert h.metadata == metas[i]


def test_deleted_and_replaced_documents_never_appear(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings, x, doc_ids = _corpus(endpoints, pg, tmp_path)
    model = settings.collection_model("docs")
    reader = IndexReader("docs", tmp_path, check_interval_s=0.0)
    q = x[7]  # pct 7, permille p7
    before = [h.doc_id for h in reader.search(q, K, where={"pct": 7})]
    assert before[0] == doc_ids[7]

    for doc in before[:5]:
        tombstone(pg, "docs", doc)
    # moved out of the filter: same vector, new metadata
    pg.execute(
        "UPDATE embeddings SET metadata = %s, seq = nextval('embedding_seq')"
        " WHERE collection = 'docs' AND doc_id = %s",
        (json.dumps({**_meta(107), "pct": 8}), before[5]),
    )
    fresh = random_unit(1, DIM, seed=77)[0]
    upsert(pg, "docs", "fresh", fresh, model=model)
    set_documents(pg, "docs", ["fresh"], ["a fresh one"], [{"pct": 7}])
    assert jobs.refresh_deltas(settings)[0]["published"]
    assert reader.reload()

    gone = set(before[:6])
    for where in ({"pct": 7}, {"permille": "p7"}, None):
        for query in (q, *random_unit(5, DIM, seed=3)):
            found = {h.doc_id for h in reader.search(query, 200, where=where)}
            assert not found & set(before[:5])
            if where is not None:
                assert not found & gone
    [hit] = reader.search(fresh, 1, where={"pct": 7})
    assert (hit.doc_id, hit.text, hit.metadata) == ("fresh", "a fresh one", {"pct": 7})
    assert before[5] in {h.doc_id for h in reader.search(q, 300, where={"pct": 8})}
    # still exact: the top 10 of what is left
    live = [
        i
        for i in range(N)
        if i % 100 == 7 and doc_ids[i] not in gone  # the delta's row is searched beside these
    ]
    hits = reader.search(q, K, where={"pct": 7})
    expected = sorted(
        [(float(x[i] @ q), doc_ids[i]) for i in live] + [(float(fresh @ q), "fresh")],
        reverse=True,
    )[:K]
    assert [h.doc_id for h in hits] == [d for _, d in expected]

    report = jobs.rebuild(settings, "docs")
    assert report["status"] == "published"
    assert reader.reload()
    assert [h.doc_id for h in reader.search(q, K, where={"pct": 7})] == [d for _, d in expected]


def test_text_and_metadata_survive_rebuild_delta_and_reload(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path)
    x = random_unit(300, DIM, seed=2)
    doc_ids = add(pg, "docs", x, model=settings.collection_model("docs"))
    texts = [f"Grüße, document {i} ✓" for i in range(300)]
    metas: list[dict[str, Any] | None] = [
        {"source": f"wiki/{i}", "n": i, "nested": {"a": [1, 2]}} if i % 2 else None
        for i in range(300)
    ]
    set_documents(pg, "docs", doc_ids, texts, metas)
    jobs.rebuild(settings, "docs")
    directory = tmp_path / "docs"
    manifest = files.read_manifest(directory)
    assert manifest is not None
    assert (directory / manifest["meta_file"]).is_file()

    def check(reader: IndexReader, i: int, meta: Any) -> None:
        [hit] = reader.search(x[i], 1)
        assert (hit.doc_id, hit.text, hit.metadata) == (doc_ids[i], texts[i], meta)

    reader = IndexReader("docs", tmp_path, check_interval_s=0.0)
    check(reader, 3, metas[3])
    check(reader, 4, None)

    # a metadata-only change travels in the delta (its seq moves, as the stage does)
    pg.execute(
        'UPDATE embeddings SET metadata = \'{"source": "moved"}\','
        " seq = nextval('embedding_seq') WHERE collection = 'docs' AND doc_id = %s",
        (doc_ids[3],),
    )
    jobs.refresh_deltas(settings)
    reader.reload()
    check(reader, 3, {"source": "moved"})
    check(IndexReader("docs", tmp_path), 3, {"source": "moved"})  # a new process's reader
    assert [h.doc_id for h in reader.search(x[3], 5, where={"source": "moved"})] == [doc_ids[3]]
    assert reader.search(x[3], 5, where={"source": "wiki/3"}) == []

    jobs.rebuild(settings, "docs")
    reader.reload()
    assert reader.version == 2
    check(reader, 3, {"source": "moved"})
    check(reader, 5, metas[5])
    check(IndexReader("docs", tmp_path), 5, metas[5])

    # the documents file is covered by the manifest's sha256: a changed byte is not served
    manifest = files.read_manifest(directory)
    assert manifest is not None
    path = directory / manifest["meta_file"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(files.IndexFileError, match="checksum"):
        files.load_version(directory, manifest, collection="docs")


def test_bad_where_is_a_clear_error(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path)
    x = random_unit(50, DIM, seed=4)
    add(pg, "docs", x, model=settings.collection_model("docs"))
    jobs.rebuild(settings, "docs")
    reader = IndexReader("docs", tmp_path)
    bad: list[tuple[Any, str]] = [
        ({1: "x"}, "keys are non-empty strings"),
        ({"": "x"}, "keys are non-empty strings"),
        ({"lang": {"$in": ["en"]}}, "nested filters are not supported"),
        ({"lang": []}, "an empty list matches nothing"),
        ({"score": 0.5}, "strings, integers or booleans"),
        ({"lang": None}, "strings, integers or booleans"),
        (["lang", "en"], "must be a mapping"),
        ({"n": list(range(2000))}, "at most 1024"),
    ]
    for where, message in bad:
        with pytest.raises(ValueError, match=message):
            reader.search(x[0], 3, where=where)
    assert len(reader.search(x[0], 3, where={})) == 3  # no condition: no filter
    assert reader.search(x[0], 3, where={"unknown": "key"}) == []


def test_text_and_metadata_are_capped_filters_still_see_every_key(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(
        endpoints, tmp_path, index_text_max_bytes=9, index_metadata_max_bytes=40
    )
    x = random_unit(20, DIM, seed=6)
    doc_ids = add(pg, "docs", x, model=settings.collection_model("docs"))
    long_text = "ab€" * 10  # 5 bytes a repeat: the cap falls inside a character
    big: dict[str, Any] = {"blob": "x" * 500, "lang": "en", "z": 1}
    texts = [long_text] + ["short"] * 19
    metas = [big, *([{"lang": "de"}] * 19)]
    set_documents(pg, "docs", doc_ids, texts, metas)
    jobs.rebuild(settings, "docs")
    reader = IndexReader("docs", tmp_path, check_interval_s=0.0)

    [hit] = reader.search(x[0], 1, where={"z": 1})  # filterable although cut for display
    assert hit.doc_id == doc_ids[0]
    assert hit.text == "ab€ab"  # 7 bytes: the next "€" (3 bytes) would pass 9
    assert hit.text_truncated
    assert hit.metadata == {"lang": "en", "z": 1}  # the filterable keys that fit
    assert hit.metadata_truncated
    [short] = reader.search(x[1], 1)
    assert (short.text, short.metadata) == ("short", {"lang": "de"})
    assert not short.text_truncated
    assert not short.metadata_truncated
    assert reader.search(x[0], 1, where={"blob": "x" * 500}) == []  # over 256 bytes: not a key

    # the delta cuts with the caps its version was built with
    upsert(pg, "docs", "late", x[0], model=settings.collection_model("docs"))
    set_documents(pg, "docs", ["late"], [long_text], [big])
    jobs.refresh_deltas(settings)
    reader.reload()
    late = [h for h in reader.search(x[0], 2, where={"z": 1}) if h.doc_id == "late"]
    assert [(h.text, h.metadata, h.text_truncated) for h in late] == [
        ("ab€ab", {"lang": "en", "z": 1}, True)
    ]


def test_hits_still_unpack_as_doc_id_and_score(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path)
    x = random_unit(30, DIM, seed=8)
    doc_ids = add(pg, "docs", x, model=settings.collection_model("docs"))
    jobs.rebuild(settings, "docs")
    hits = IndexReader("docs", tmp_path).search(x[2], 3)
    [(doc, score), *_] = hits
    assert doc == hits[0][0] == hits[0].doc_id == doc_ids[2]
    assert score == hits[0][1] == hits[0].score
    assert {d: sc for d, sc in hits} == {h.doc_id: h.score for h in hits}
