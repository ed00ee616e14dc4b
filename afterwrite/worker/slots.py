"""At most N holders of a named resource at once, across processes and hosts, in Redis.

Each slot is a key set with ``NX`` and an expiry, so a holder that dies frees its slot when the
expiry passes. Release deletes the key only if it still holds the holder's token.
"""

from __future__ import annotations

import secrets

import redis

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class Slot:
    def __init__(self, conn: redis.Redis, key: str, token: str) -> None:
        self._conn = conn
        self.key = key
        self._token = token

    def release(self) -> None:
        self._conn.eval(_RELEASE, 1, self.key, self._token)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Unlimited(Slot):
    """Held while Redis is out of memory: nothing to release."""

    def release(self) -> None:
        pass


def acquire(conn: redis.Redis, name: str, limit: int, ttl_ms: int) -> Slot | None:
    """One of ``limit`` slots of ``name`` for at most ``ttl_ms``, or None if all are taken.

    A Redis out of memory refuses the SET that takes a slot; the caller gets a slot anyway.
    The work slots guard (draining) is what frees that memory, and reads, acknowledgements and
    deletions are still allowed: refusing it would deadlock the pipeline on a full Redis.
    """
    token = secrets.token_hex(8)
    for i in range(limit):
        key = f"{name}:{i}"
        try:
            taken = conn.set(key, token, nx=True, px=ttl_ms)
        except redis.exceptions.OutOfMemoryError:
            return _Unlimited(conn, key, token)
        if taken:
            return Slot(conn, key, token)
    return None
