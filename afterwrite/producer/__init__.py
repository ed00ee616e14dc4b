"""The afterwrite client used in request handlers, and the index reader for searching."""

from typing import TYPE_CHECKING, Any

from afterwrite.producer.aio import AsyncClient
from afterwrite.producer.client import Client
from afterwrite.producer.records import Outcome, ProducerStats, Receipt

if TYPE_CHECKING:
    from afterwrite.readers.index_reader import IndexReader, IndexUnavailable

__all__ = [
    "AsyncClient",
    "Client",
    "IndexReader",
    "IndexUnavailable",
    "Outcome",
    "ProducerStats",
    "Receipt",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: a service that only records never loads FAISS and numpy.
    if name in {"IndexReader", "IndexUnavailable"}:
        from afterwrite.readers import index_reader

        return getattr(index_reader, name)
    raise AttributeError(f"module 'producer' has no attribute {name!r}")
