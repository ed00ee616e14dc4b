"""Read back what was written: a user's history, a conversation, one record, full-text and
similar-question search over ``query_history`` (see :mod:`afterwrite.history.api`).

Layer: above the models (it reads their tables) and the readers (``similar`` searches an
index), below the worker and the CLI; it loads neither Celery nor the worker, so a web process
can read history as cheaply as it records.
"""

from afterwrite.history.api import AsyncHistory, History
from afterwrite.history.connections import HistorySchemaMissing, HistoryUnavailable
from afterwrite.history.cursor import InvalidCursor
from afterwrite.history.records import Hit, Page, StoredQuery

__all__ = [
    "AsyncHistory",
    "History",
    "HistorySchemaMissing",
    "HistoryUnavailable",
    "Hit",
    "InvalidCursor",
    "Page",
    "StoredQuery",
]
