"""One search over a served view: the built version (optionally filtered) and its delta.

Used by :class:`afterwrite.readers.index_reader.IndexReader`; loads numpy and FAISS (the
reader imports it on its first construction).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from afterwrite.readers.hits import Hit
from afterwrite.vectorindex import documents, files, filtered


def search_version(
    loaded: files.Loaded,
    masked: npt.NDArray[np.int64],
    params: Any,
    query: npt.NDArray[np.float32],
    k: int,
    conditions: Mapping[str, list[Any]] | None,
) -> list[Hit]:
    """Top ``k`` of the built index (``masked`` ids hidden by ``params``), with documents."""
    index: faiss.Index = loaded.index
    if not index.ntotal:
        return []
    docmap, stored = loaded.docs, loaded.documents
    if conditions is None:
        scores, ids = index.search(query, min(k, int(index.ntotal)), params=params)
        s, i = scores[0], ids[0]
    else:
        assert stored is not None  # IndexReader.search refuses filters without documents
        found = filtered.search_filtered(
            index, docmap.ids, stored, query, k, conditions, masked=masked, params=params
        )
        s, i = found.scores, found.ids
    rows, present = docmap.positions(i)
    out = []
    for score, row, ok in zip(s.tolist(), rows.tolist(), present.tolist(), strict=True):
        if not ok:
            continue
        doc_id = docmap.doc_ids[row].decode()
        if stored is None:
            out.append(Hit(doc_id, score))
        else:
            out.append(Hit(doc_id, score, *stored.document(row)))
    return out


def search_delta(
    delta: files.Delta | None,
    postings: Mapping[bytes, npt.NDArray[np.int64]] | None,
    query: npt.NDArray[np.float32],
    k: int,
    conditions: Mapping[str, list[Any]] | None,
) -> list[Hit]:
    """Top ``k`` of the delta's live rows (exact), matching ``conditions``."""
    if delta is None or not len(delta.doc_ids):
        return []
    if conditions is None:
        rows = np.arange(len(delta.doc_ids))
    else:
        rows = documents.delta_rows(postings or {}, conditions)
        if not len(rows):
            return []
    scores = delta.vectors[rows] @ query[0]
    top = np.argsort(-scores, kind="stable")[:k]
    out = []
    for t in top.tolist():
        row = int(rows[t])
        score = float(scores[t])
        if delta.documents:
            out.append(Hit(delta.doc_ids[row], score, *documents.stored(delta.documents[row])))
        else:
            out.append(Hit(delta.doc_ids[row], score))
    return out
