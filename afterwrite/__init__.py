"""afterwrite: write-behind persistence for AI/LLM backends.

The public API::

    from afterwrite import Client, AsyncClient, IndexReader, Receipt, Outcome
    from afterwrite import Error, ConfigurationError, TransientError, PoisonError
    from afterwrite import erase_user  # erasure of one user everywhere (loads the worker side)

Names are imported on first use, so ``import afterwrite`` costs almost nothing, recording loads
only the producer (no SQLAlchemy, psycopg, Celery, numpy or FAISS), and numpy and FAISS load
only when an ``IndexReader`` is constructed.
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
    from afterwrite.producer.aio import AsyncClient
    from afterwrite.producer.client import Client
    from afterwrite.producer.records import Outcome, ProducerStats, Receipt
    from afterwrite.readers.index_reader import IndexReader, IndexUnavailable
    from afterwrite.worker.operations.erasure import erase_user

_LAZY = {
    "AsyncClient": "afterwrite.producer.aio",
    "Client": "afterwrite.producer.client",
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
    "Client",
    "ConfigurationError",
    "Error",
    "IndexReader",
    "IndexUnavailable",
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
