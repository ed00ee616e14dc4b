"""afterwrite: write-behind persistence for AI/LLM backends.

The public API::

    from afterwrite import Client, AsyncClient, IndexReader, Hit, Receipt, Outcome
    from afterwrite import History, AsyncHistory  # read back what was written
    from afterwrite import Error, ConfigurationError, TransientError, PoisonError
    from afterwrite import erase_user  # erasure of one user everywhere (loads the worker side)

Names are imported on first use, so ``import afterwrite`` costs almost nothing, recording loads
only the producer (no SQLAlchemy, psycopg, Celery, numpy or FAISS), and numpy and FAISS load
only when an ``IndexReader`` is constructed. ``History`` loads psycopg and the models, not
Celery or the worker.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from afterwrite.core.errors import (
    ConfigurationError,
    Error,
    PoisonError,
    SettingsError,
    TransientError,
)

if TYPE_CHECKING:
    from afterwrite.core.kinds import UnknownKindError
    from afterwrite.history import AsyncHistory, History, InvalidCursor
    from afterwrite.producer.aio import AsyncClient
    from afterwrite.producer.client import Client
    from afterwrite.producer.records import Outcome, ProducerStats, Receipt
    from afterwrite.readers.hits import Hit
    from afterwrite.readers.index_reader import IndexReader, IndexUnavailable
    from afterwrite.worker.operations.erasure import erase_user

_LAZY = {
    "AsyncClient": "afterwrite.producer.aio",
    "AsyncHistory": "afterwrite.history",
    "History": "afterwrite.history",
    "InvalidCursor": "afterwrite.history",
    "Client": "afterwrite.producer.client",
    "Hit": "afterwrite.readers.hits",
    "IndexReader": "afterwrite.readers.index_reader",
    "IndexUnavailable": "afterwrite.readers.index_reader",
    "Outcome": "afterwrite.producer.records",
    "ProducerStats": "afterwrite.producer.records",
    "Receipt": "afterwrite.producer.records",
    "UnknownKindError": "afterwrite.core.kinds",
    "erase_user": "afterwrite.worker.operations.erasure",
}

__all__ = [
    "AsyncClient",
    "AsyncHistory",
    "Client",
    "ConfigurationError",
    "Error",
    "History",
    "Hit",
    "IndexReader",
    "IndexUnavailable",
    "InvalidCursor",
    "Outcome",
    "PoisonError",
    "ProducerStats",
    "Receipt",
    "SettingsError",
    "TransientError",
    "UnknownKindError",
    "erase_user",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'afterwrite' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
