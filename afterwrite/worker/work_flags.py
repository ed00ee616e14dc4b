"""Flags in Redis that say "there is work": set by whoever makes it, taken by whoever does it.

The dispatcher (afterwrite.worker.tasks.dispatch) reads them, with every stream's length, in
one round trip a second, and sends only the tasks that have something to do. Taking a flag
(GETDEL) comes before the work, so work made meanwhile raises it again and is not missed. A
lost flag (Redis restarted, a refused write) costs at most the dispatcher's fallback interval.
"""

from __future__ import annotations

import contextlib

import redis

EMBED = "embed"
"""Embedding jobs were stored (by the drain of the ``embed`` kind)."""
INDEX = "index"
"""Vectors or tombstones changed (by the embedding stage): a delta to publish."""


def key(prefix: str, what: str) -> str:
    return f"{prefix}:work:{what}"


def raise_flag(conn: redis.Redis, prefix: str, what: str) -> None:
    with contextlib.suppress(redis.RedisError):  # a full Redis: the fallback interval covers it
        conn.set(key(prefix, what), 1)


def take(conn: redis.Redis, prefix: str, what: str) -> bool:
    """Whether the flag was up; it is down afterwards."""
    return conn.getdel(key(prefix, what)) is not None
