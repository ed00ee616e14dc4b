"""Top-k among the documents a metadata filter matches, on a built FAISS index. No I/O.

The filter's rows come from the version's postings (:mod:`afterwrite.vectorindex.documents`):
per key, the union of its values' rows (one value per key and document, so the lists are
disjoint and their lengths add up); across keys, the intersection. Two paths, chosen by the
estimated share of matching documents ``s`` (the smallest key's count over the index size):

- **broad** (``k * OVERFETCH / s <= POSTFILTER_MAX_K``, e.g. ``s ≥ 8 %`` at ``k = 10``): an
  ordinary search for ``k / s * OVERFETCH`` neighbours, kept when they match. The matching
  documents among the global top-k' are the top matching documents, so this is exact on an
  exact index; when fewer than ``k`` survive, the subset path answers instead.
- **selective**: the matching ids go into an ``IDSelectorBatch`` and the index is searched
  over them only: an IVF index scans every list (``nprobe = nlist``) and computes distances for
  selected ids only, a flat index likewise; any other index type (HNSW, whose graph search
  cannot reach scattered selected nodes) reconstructs the subset's vectors and ranks them
  exactly with numpy.

Either way the answer has ``min(k, matching)`` hits: never fewer because the filter was
applied after the search.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from afterwrite.vectorindex.documents import Documents, Scalar

POSTFILTER_MAX_K = 256
"""The broad path fetches at most this many neighbours."""
OVERFETCH = 2.0
"""The broad path fetches ``k / share * OVERFETCH`` neighbours (slack for uneven spread)."""

Rows = npt.NDArray[np.int32]


@dataclass(frozen=True)
class Found:
    scores: npt.NDArray[np.float32]
    ids: npt.NDArray[np.int64]
    path: str
    """``broad``, ``selective``, ``selective-fallback`` (the broad path came up short) or
    ``empty``."""


def key_rows(documents: Documents, where: Mapping[str, list[Scalar]]) -> list[list[Rows]]:
    """Per key of ``where``, the posting arrays of its values (each ascending)."""
    return [
        [p for p in (documents.postings(key, v) for v in values) if len(p)]
        for key, values in where.items()
    ]


def member(rows: npt.NDArray[Any], arrays: list[Rows]) -> npt.NDArray[np.bool_]:
    """Which of ``rows`` are in any of the ascending ``arrays``."""
    mask = np.zeros(len(rows), dtype=bool)
    for a in arrays:
        pos = np.minimum(np.searchsorted(a, rows), len(a) - 1)
        mask |= a[pos] == rows
    return mask


def matching_rows(per_key: list[list[Rows]]) -> Rows:
    """The rows every key matches, ascending."""
    order = sorted(range(len(per_key)), key=lambda i: sum(len(a) for a in per_key[i]))
    first = per_key[order[0]]
    if not first:
        return np.empty(0, dtype=np.int32)
    rows: Rows = np.sort(np.concatenate(first)) if len(first) > 1 else first[0]
    for i in order[1:]:
        rows = rows[member(rows, per_key[i])]
    return rows


def choose_path(estimate: int, n: int, k: int) -> tuple[str, int]:
    """``("broad", neighbours to fetch)`` or ``("selective", 0)`` for a filter matching about
    ``estimate`` of ``n`` documents."""
    fetch = math.ceil(k * OVERFETCH * n / max(estimate, 1))
    return ("broad", fetch) if fetch <= POSTFILTER_MAX_K else ("selective", 0)


def search_filtered(
    index: faiss.Index,
    doc_ids: npt.NDArray[np.int64],
    documents: Documents,
    query: npt.NDArray[np.float32],
    k: int,
    where: Mapping[str, list[Scalar]],
    *,
    masked: npt.NDArray[np.int64],
    params: Any,
) -> Found:
    """Top-``k`` ids of ``index`` whose documents match ``where``, not ``masked``.
    ``doc_ids`` are the version's ids (ascending: row ``i`` of ``documents`` is ``doc_ids[i]``),
    ``params`` the view's search parameters (masking ``masked``)."""
    n = int(index.ntotal)
    per_key = key_rows(documents, where)
    estimate = min(sum(len(a) for a in arrays) for arrays in per_key)
    if n == 0 or estimate == 0:
        return _empty("empty")
    path, fetch = choose_path(estimate, n, k)
    if path == "broad":
        scores, ids = index.search(query, min(fetch, n), params=params)
        s, i = scores[0], ids[0]
        valid = i >= 0
        s, i = s[valid], i[valid]
        rows = np.searchsorted(doc_ids, i)
        keep = np.ones(len(i), dtype=bool)
        for arrays in per_key:
            keep &= member(rows, arrays)
        if int(keep.sum()) >= k:
            return Found(s[keep][:k], i[keep][:k], "broad")
        path = "selective-fallback"
    rows = matching_rows(per_key)
    ids_ = doc_ids[rows]
    if masked.size:
        ids_ = ids_[~np.isin(ids_, masked)]
    if not len(ids_):
        return _empty(path)
    scores, found = subset_search(index, query, min(k, len(ids_)), ids_)
    return Found(scores, found, path)


def subset_search(
    index: faiss.Index,
    query: npt.NDArray[np.float32],
    k: int,
    ids: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top-``k`` of ``index`` among ``ids`` (every id in the index), best first."""
    fx: Any = faiss  # the stubs lack the SearchParameters keyword constructors
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
    ivf = _ivf(index)
    if ivf is not None:
        params = fx.SearchParametersIVF(sel=selector, nprobe=int(ivf.nlist))
    elif isinstance(_inner(index), faiss.IndexFlat):
        params = fx.SearchParameters(sel=selector)
    else:
        vectors = index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
        scores = vectors @ query[0]
        top = np.argsort(-scores, kind="stable")[:k]
        return scores[top].astype(np.float32), ids[top]
    scores, found = index.search(query, k, params=params)
    keep = found[0] >= 0
    return scores[0][keep], found[0][keep]


def _ivf(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _inner(index: faiss.Index) -> faiss.Index:
    inner = index.index if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2) else index
    return faiss.downcast_index(inner)


def _empty(path: str) -> Found:
    return Found(np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64), path)
