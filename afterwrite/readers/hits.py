"""What ``IndexReader.search`` returns: hits that carry their document and still unpack as
``(doc_id, score)``.

``search`` kept its name and gained fields rather than a second method appearing beside it:
every caller written for ``for doc_id, score in reader.search(...)`` (or ``hits[0][0]``) keeps
working unchanged, and there is one search to learn, not two that differ in what they return.
Importing this module loads nothing heavy (no numpy).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result. ``text`` and ``metadata`` are as the index version stored them (cut
    at ``AFTERWRITE_INDEX_TEXT_MAX_BYTES`` / ``AFTERWRITE_INDEX_METADATA_MAX_BYTES``: see the
    ``*_truncated`` flags); None for a version built before documents travelled with it.

    Iterates, indexes and has the length of the pair ``(doc_id, score)``."""

    doc_id: str
    score: float
    text: str | None = None
    metadata: dict[str, Any] | None = None
    text_truncated: bool = False
    metadata_truncated: bool = False

    def __iter__(self) -> Iterator[Any]:
        return iter((self.doc_id, self.score))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> Any:
        return (self.doc_id, self.score)[i]

    def as_dict(self) -> dict[str, Any]:
        return {
            "doc_id": self.doc_id,
            "score": self.score,
            "text": self.text,
            "metadata": self.metadata,
            "text_truncated": self.text_truncated,
            "metadata_truncated": self.metadata_truncated,
        }
