"""Opaque keyset cursors: where a page ended, bound to the query that made it.

A cursor is the last record's ``(created_at, id)`` (the page's sort key) plus a fingerprint of
the query's filters, base64url-encoded. The next page continues strictly after that key, so a
walk neither repeats nor skips a row, whatever is inserted meanwhile, and costs an index range
scan however deep it goes (never ``OFFSET``). A cursor given to a query with other filters
raises :class:`InvalidCursor` instead of returning some other query's rows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from datetime import datetime
from typing import Any

from afterwrite.core.errors import ConfigurationError

_VERSION = 1


class InvalidCursor(ConfigurationError, ValueError):
    """A cursor that is not one of ours, was damaged, or belongs to a query with other filters:
    a caller's mistake (start the walk again without a cursor)."""


def fingerprint(method: str, filters: dict[str, Any]) -> str:
    """A short hash of the query a cursor belongs to (the method and its filters)."""
    canonical = json.dumps([method, filters], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode(query_fingerprint: str, created_at: datetime, event_id: str) -> str:
    raw = json.dumps([_VERSION, query_fingerprint, created_at.isoformat(), event_id])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(cursor: str, query_fingerprint: str) -> tuple[datetime, uuid.UUID]:
    """The ``(created_at, id)`` after which the next page starts. Raises InvalidCursor."""
    if not isinstance(cursor, str) or not cursor:
        raise InvalidCursor(f"a cursor is a non-empty string from next_cursor, not {cursor!r:.60}")
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        version, fp, created_at, event_id = json.loads(base64.urlsafe_b64decode(padded))
        key = (datetime.fromisoformat(created_at), uuid.UUID(event_id))
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidCursor(f"not a history cursor: {cursor!r:.60}") from None
    if version != _VERSION or key[0].tzinfo is None:
        raise InvalidCursor(f"not a history cursor: {cursor!r:.60}")
    if fp != query_fingerprint:
        raise InvalidCursor(
            "this cursor belongs to another query (other filters or another method): "
            "pass the same arguments as the call that returned it, or start without a cursor"
        )
    return key
