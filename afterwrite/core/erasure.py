"""Which user a record names, and the tombstones erasure leaves for the drains. Pure.

A record names a user through its ``user_id`` field (``query`` and any kind with that column)
or a ``user_id`` / ``user`` key in its ``tags`` (metrics) or ``metadata`` (embeddings). The
erasure log and the tombstones hold :func:`user_hash` of the id, never the id.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

USER_KEYS = ("user_id", "user")
"""Keys of ``tags`` and ``metadata`` that name a user."""
NESTED = ("tags", "metadata")


def user_hash(user_id: str) -> str:
    """sha256 of the user id, hex: what the erasure log and the tombstones keep."""
    return hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()


def users_named(payload: Any) -> list[str]:
    """The user ids ``payload`` (a decoded record) names; usually none or one."""
    if not isinstance(payload, dict):
        return []
    found = []
    value = payload.get("user_id")
    if isinstance(value, str):
        found.append(value)
    for field in NESTED:
        nested = payload.get(field)
        if isinstance(nested, dict):
            for key in USER_KEYS:
                value = nested.get(key)
                if isinstance(value, str):
                    found.append(value)
    return found


def tombstone_key(prefix: str) -> str:
    """The Redis hash of tombstones: user hash → erasure time (epoch milliseconds)."""
    return f"{prefix}:erased"


def recorded_ms(payload: dict[str, Any], entry_ms: int) -> int:
    """When a record was made, as far as a drain can tell: the earlier of its ``created_at``
    and the time Redis took it (a spilled entry replayed after an erasure keeps its
    ``created_at`` from before)."""
    created = payload.get("created_at")
    if isinstance(created, datetime) and created.tzinfo is not None:
        return min(entry_ms, int(created.timestamp() * 1000))
    return entry_ms


def is_erased(payload: Any, entry_ms: int, tombstones: dict[str, int]) -> bool:
    """Whether ``payload`` names a user erased after it was recorded. A record made after
    the erasure is not (it is stored normally)."""
    if not tombstones or not isinstance(payload, dict):
        return False
    for user in users_named(payload):
        erased_at = tombstones.get(user_hash(user))
        if erased_at is not None and recorded_ms(payload, entry_ms) <= erased_at:
            return True
    return False
