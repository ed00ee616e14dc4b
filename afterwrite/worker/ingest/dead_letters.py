"""The dead-letter store: entries that can never be stored, kept with their reason.

Writes happen inside the batch's transaction, so a batch's good rows and its dead letters
commit together. A repeated payload (a redelivery after a crash, a failed replay) updates its
existing row (``delivery_count``, ``last_seen_at``) instead of adding one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg

_INSERT = """
INSERT INTO dead_letters
    (kind, entry_id, event_id, payload_raw, payload_sha256, payload, reason, error_code,
     detail, delivery_count)
VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s)
ON CONFLICT (kind, payload_sha256) DO UPDATE SET
    entry_id = EXCLUDED.entry_id,
    reason = EXCLUDED.reason,
    error_code = EXCLUDED.error_code,
    detail = EXCLUDED.detail,
    delivery_count = dead_letters.delivery_count + EXCLUDED.delivery_count,
    last_seen_at = now()
"""

_json_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class DeadEntry:
    kind: str
    entry_id: str
    payload_raw: bytes
    payload: Any
    """The decoded payload, or None when it could not be decoded."""
    reason: str
    error_code: str | None
    detail: str
    deliveries: int = 1

    @property
    def event_id(self) -> str | None:
        if isinstance(self.payload, dict):
            value = self.payload.get("id")
            if isinstance(value, str):
                return value[:64]
        return None


def display_json(payload: Any) -> str | None:
    """The payload as JSON jsonb accepts, for people and filters; None when not representable.

    NUL characters (which jsonb refuses) are shown as the six characters ``\\u0000``; the exact
    bytes stay in ``payload_raw``.
    """
    if payload is None:
        return None
    try:
        text = _json_encode(payload).decode()
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError):
        return None
    return text.replace("\\u0000", "\\\\u0000")


def add(conn: psycopg.Connection[Any], entries: Sequence[DeadEntry]) -> None:
    """Store ``entries`` in the caller's transaction (no commit)."""
    if not entries:
        return
    with conn.cursor() as cur:
        cur.executemany(
            _INSERT,
            [
                (
                    e.kind,
                    e.entry_id,
                    e.event_id,
                    e.payload_raw,
                    hashlib.sha256(e.payload_raw).digest(),
                    display_json(e.payload),
                    e.reason,
                    e.error_code,
                    e.detail[:2000],
                    e.deliveries,
                )
                for e in entries
            ],
        )
