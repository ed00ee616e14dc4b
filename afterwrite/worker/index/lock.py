"""One builder per collection at a time: a PostgreSQL session advisory lock.

Why not a Redis ``SET NX PX`` lock: a lease has to be renewed while a build runs and expires
on a timer, so a builder stalled past its lease (a long FAISS add, a GC pause, swap) keeps
writing while a second one starts. A session advisory lock is held exactly as long as the
connection lives: when the holder dies (SIGKILL, OOM, lost host) the server ends the session
and the lock is free at once; while it lives, no timer can take the lock away. The builder
needs PostgreSQL anyway, and nothing needs renewing.

Keys: ``pg_try_advisory_lock(classid, objid)`` with a fixed class for afterwrite indexes and a
64-bit hash of ``<purpose>:<collection>`` folded into the 32-bit object id.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from afterwrite.core.errors import TransientError

LOCK_CLASS = 0x4157_4958  # "AWIX"
BUILD = "build"
DELTA = "delta"


class LockBusy(TransientError, RuntimeError):
    """Another process holds the lock: try again when it is done."""


def lock_key(purpose: str, collection: str) -> int:
    digest = hashlib.blake2b(f"{purpose}:{collection}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextmanager
def collection_lock(
    url: str, purpose: str, collection: str, *, wait_s: float = 0.0
) -> Iterator[psycopg.Connection[Any]]:
    """Hold the ``purpose`` lock of ``collection`` for the ``with`` block, on a connection of
    its own (returned, for reads that need no transaction of the caller's). Raises
    :class:`LockBusy` when another session holds it for longer than ``wait_s``."""
    key = lock_key(purpose, collection)
    conn = psycopg.connect(url, autocommit=True, application_name=f"afterwrite-index-{purpose}")
    try:
        deadline = time.monotonic() + wait_s
        while True:
            row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, key)).fetchone()
            if row and row[0]:
                break
            if time.monotonic() >= deadline:
                raise LockBusy(f"another {purpose} of {collection!r} is running")
            time.sleep(0.05)
        try:
            yield conn
        finally:
            if not conn.closed and not conn.broken:
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, key))
    finally:
        conn.close()
