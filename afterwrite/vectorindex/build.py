"""Building a FAISS index from vectors in memory, tuning it, and measuring its recall.

No I/O. The index uses inner product on unit vectors (= cosine). ``build_index`` trains (IVF),
adds in chunks with progress, and for approximate indexes raises ``nprobe`` / ``efSearch``
until recall@10 on a tuning sample reaches the target; those values are stored inside the
serialised index, so readers search with them. ``recall_at_10`` then measures the result on a
separate sample against exact search.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from afterwrite.vectorindex.choose import Choice, ivf_nprobe_start

ADD_CHUNK = 50_000
TRAIN_POINTS_PER_LIST = 50
RECALL_K = 10
TUNE_QUERIES = 64
EVAL_QUERIES = 160
"""Exact search of these queries over every vector is most of the check's cost (1M x 384:
~10 ms per query); 1,600 neighbours estimate recall@10 within about ±0.01 at 0.95."""
TUNE_RECALL_TARGET = 0.95
QUERY_NOISE = 0.5
"""Sample queries are data vectors plus noise of this norm, renormalised: real queries are near
the data, not on it (a data vector as its own query flatters IVF)."""

BuildProgress = Callable[[str, int, int], None]


@dataclass
class Built:
    index: faiss.Index
    factory: str
    recall_at_10: float | None
    params: dict[str, int] = field(default_factory=dict)
    train_s: float = 0.0
    add_s: float = 0.0
    tune_s: float = 0.0
    reused_quantizer: bool = False
    """The IVF coarse quantizer was the ``centroids`` given, not trained here."""


def make_index(factory: str, dim: int) -> faiss.Index:
    """An empty index for ``factory`` that stores ids: IVF keeps them in its lists, anything
    else is wrapped in ``IndexIDMap2``."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if _ivf(index) is None and not isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        wrapped = faiss.IndexIDMap2(index)
        inner: Any = index
        inner.this.disown()
        wrapped.own_fields = True
        index = wrapped
    return index


def _ivf(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw(index: faiss.Index) -> Any:
    inner = index.index if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2) else index
    inner = faiss.downcast_index(inner)
    return getattr(inner, "hnsw", None)


def sample_queries(
    vectors: npt.NDArray[np.float32], n: int, *, seed: int
) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    pick = rng.choice(vectors.shape[0], size=min(n, vectors.shape[0]), replace=False)
    noise = rng.standard_normal((pick.shape[0], vectors.shape[1])).astype(np.float32)
    noise *= QUERY_NOISE / np.sqrt(vectors.shape[1])
    queries = vectors[np.sort(pick)] + noise
    faiss.normalize_L2(queries)
    return np.ascontiguousarray(queries, dtype=np.float32)


def exact_top(
    queries: npt.NDArray[np.float32],
    vectors: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int64],
    k: int,
    *,
    chunk_rows: int = 50_000,
) -> npt.NDArray[np.int64]:
    """Exact top-``k`` ids by inner product: BLAS matmul per chunk + argpartition (measured
    here ~4× faster than ``faiss.knn`` for a few hundred queries over a million vectors)."""
    n = vectors.shape[0]
    k = min(k, n)
    nq = queries.shape[0]
    best_s = np.empty((nq, 0), dtype=np.float32)
    best_i = np.empty((nq, 0), dtype=np.int64)
    for start in range(0, n, chunk_rows):
        scores = queries @ vectors[start : start + chunk_rows].T
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, part, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(cand_s, keep, axis=1)
        best_i = np.take_along_axis(cand_i, keep, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    out: npt.NDArray[np.int64] = ids[np.take_along_axis(best_i, order, axis=1)]
    return out


def recall(found: npt.NDArray[np.int64], truth: npt.NDArray[np.int64]) -> float:
    """Mean share of each query's exact top-k that the index also returned."""
    k = truth.shape[1]
    if truth.shape[0] == 0 or k == 0:
        return 1.0
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return float(hits / (truth.shape[0] * k))


def _measure(
    index: faiss.Index, queries: npt.NDArray[np.float32], truth: npt.NDArray[np.int64]
) -> float:
    _, found = index.search(queries, truth.shape[1])
    return recall(found, truth)


def build_index(
    choice: Choice,
    ids: npt.NDArray[np.int64],
    vectors: npt.NDArray[np.float32],
    *,
    recall_target: float = TUNE_RECALL_TARGET,
    progress: BuildProgress | None = None,
    seed: int = 0,
    centroids: npt.NDArray[np.float32] | None = None,
) -> Built:
    """Train, add and tune the index ``choice`` names over ``vectors`` (unit, float32).

    ``centroids``: a coarse quantizer to use instead of training one (an earlier version's,
    see :func:`afterwrite.vectorindex.files.quantizer_centroids`); taken only by an
    ``IVF…,Flat`` index with that many lists of that dimension (its only trained part),
    otherwise ignored. The recall measured afterwards is of the index as built either way."""
    n, dim = vectors.shape
    index = make_index(choice.factory, dim)
    t0 = time.perf_counter()
    reused = centroids is not None and _reuse_quantizer(index, centroids)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        ivf = _ivf(index)
        lists = int(ivf.nlist) if ivf is not None else 256
        size = min(n, max(lists * TRAIN_POINTS_PER_LIST, 10_000))
        pick = np.sort(rng.choice(n, size=size, replace=False)) if size < n else slice(None)
        if ivf is not None:
            ivf.cp.niter = 10
            ivf.cp.min_points_per_centroid = 1  # a small sample is deliberate, not a mistake
        index.train(np.ascontiguousarray(vectors[pick]))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for start in range(0, n, ADD_CHUNK):
        end = min(n, start + ADD_CHUNK)
        index.add_with_ids(vectors[start:end], ids[start:end])
        if progress is not None:
            progress("build", end, n)
    add_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    built = Built(
        index, choice.factory, None, train_s=train_s, add_s=add_s, reused_quantizer=reused
    )
    if n:
        tune_q = sample_queries(vectors, TUNE_QUERIES, seed=seed + 1)
        eval_q = sample_queries(vectors, EVAL_QUERIES, seed=seed + 2)
        truth = exact_top(np.concatenate([tune_q, eval_q]), vectors, ids, RECALL_K)
        tune_truth, eval_truth = truth[: len(tune_q)], truth[len(tune_q) :]
        built.params = _tune(index, tune_q, tune_truth, recall_target)
        built.recall_at_10 = _measure(index, eval_q, eval_truth)
        if progress is not None:
            progress("check", 1, 1)
    built.tune_s = time.perf_counter() - t0
    return built


def _reuse_quantizer(index: faiss.Index, centroids: npt.NDArray[np.float32]) -> bool:
    """Make ``centroids`` the coarse quantizer of an untrained ``IVF…,Flat`` ``index``
    (True), or leave it untouched (False: another kind of index, or centroids of another
    shape or with non-finite values)."""
    ivf = _ivf(index)
    if (
        ivf is None
        or index.is_trained
        or not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat)
    ):
        return False
    if centroids.shape != (int(ivf.nlist), int(ivf.d)) or not np.all(np.isfinite(centroids)):
        return False
    ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    ivf.is_trained = True
    return True


def _tune(
    index: faiss.Index,
    queries: npt.NDArray[np.float32],
    truth: npt.NDArray[np.int64],
    target: float,
) -> dict[str, int]:
    ivf = _ivf(index)
    if ivf is not None:
        nprobe = ivf_nprobe_start(int(ivf.nlist))
        while True:
            ivf.nprobe = nprobe
            if nprobe >= ivf.nlist or _measure(index, queries, truth) >= target:
                return {"nprobe": nprobe}
            nprobe = min(int(ivf.nlist), nprobe * 2)
    hnsw = _hnsw(index)
    if hnsw is not None:
        ef = 32
        while True:
            hnsw.efSearch = ef
            if ef >= 2048 or _measure(index, queries, truth) >= target:
                return {"efSearch": ef}
            ef *= 2
    return {}
