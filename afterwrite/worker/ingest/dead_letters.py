"""The dead-letter store: entries that can never be stored, kept with their reason.

Writes happen inside the batch's transaction, so a batch's good rows and its dead letters
commit together. A repeated payload (a redelivery after a crash, a failed replay) updates its
existing row (``delivery_count``, ``last_seen_at``) instead of adding one.

Stored payloads are capped (``AFTERWRITE_DEAD_LETTER_MAX_PAYLOAD_BYTES``, 64 KiB): a longer one
keeps only its head in ``payload_raw``; ``payload_sha256`` is always the sha256 of the whole
payload (so a capped row is the one whose ``payload_raw`` does not hash to it), and ``payload``
holds ``{"afterwrite_truncated": {"bytes": <whole length>, "stored_bytes": …, "sha256": …}}``
instead of the decoded payload. A capped entry cannot be replayed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
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

MAX_PAYLOAD_BYTES = 64 * 1024
"""Default of ``AFTERWRITE_DEAD_LETTER_MAX_PAYLOAD_BYTES``."""
TRUNCATED_KEY = "afterwrite_truncated"
_CAP_VARIABLE = "AFTERWRITE_DEAD_LETTER_MAX_PAYLOAD_BYTES"


@functools.cache
def payload_cap() -> int:
    """This process's cap, from ``AFTERWRITE_DEAD_LETTER_MAX_PAYLOAD_BYTES`` (read once,
    validated as the setting is)."""
    raw = os.environ.get(_CAP_VARIABLE)
    if raw is None:
        return MAX_PAYLOAD_BYTES
    from afterwrite.core.settings import load_settings

    return load_settings({_CAP_VARIABLE: raw}).dead_letter_max_payload_bytes


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
    whole_bytes: int | None = None
    """Set when ``payload_raw`` is already only the head of a longer payload (an over-long
    import line): the whole payload's length, with ``whole_sha256`` its sha256."""
    whole_sha256: bytes | None = None

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
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError, RecursionError):
        return None  # nested deeper than the encoder goes: payload_raw keeps the bytes
    return text.replace("\\u0000", "\\\\u0000")


def stored_payload(entry: DeadEntry, cap: int) -> tuple[bytes, bytes, str | None]:
    """``(payload_raw, payload_sha256, payload)`` as stored: the whole payload when it fits in
    ``cap`` bytes, else its head, the whole one's sha256 and the truncation marker."""
    raw = entry.payload_raw
    whole = entry.whole_bytes if entry.whole_bytes is not None else len(raw)
    sha = entry.whole_sha256 if entry.whole_sha256 is not None else hashlib.sha256(raw).digest()
    if whole <= cap and len(raw) == whole:
        return raw, sha, display_json(entry.payload)
    head = raw[:cap]
    marker = {"bytes": whole, "stored_bytes": len(head), "sha256": sha.hex()}
    return head, sha, json.dumps({TRUNCATED_KEY: marker})


def is_capped(payload_raw: bytes, payload_sha256: bytes) -> bool:
    """A stored row whose payload was capped: its bytes are not the whole payload."""
    return hashlib.sha256(payload_raw).digest() != bytes(payload_sha256)


def add(
    conn: psycopg.Connection[Any],
    entries: Sequence[DeadEntry],
    *,
    max_payload_bytes: int | None = None,
) -> None:
    """Store ``entries`` in the caller's transaction (no commit), payloads capped at
    ``max_payload_bytes`` (default: :func:`payload_cap`)."""
    if not entries:
        return
    cap = payload_cap() if max_payload_bytes is None else max_payload_bytes
    rows = []
    for e in entries:
        raw, sha, payload = stored_payload(e, cap)
        rows.append(
            (
                e.kind,
                e.entry_id,
                e.event_id,
                raw,
                sha,
                payload,
                e.reason,
                e.error_code,
                e.detail[:2000],
                e.deliveries,
            )
        )
    with conn.cursor() as cur:
        cur.executemany(_INSERT, rows)
