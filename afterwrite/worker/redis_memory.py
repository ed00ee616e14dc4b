"""What afterwrite needs of the Redis it runs on: no eviction, and room to drain.

An eviction policy other than ``noeviction`` deletes whole streams and their consumer groups
under memory pressure: records that producers were told were ``sent`` vanish, and nothing
else notices. So workers and beat refuse to start on such a Redis, ``afterwrite health``
fails naming the policy, and producers log it once (afterwrite.producer.gate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from afterwrite.core.errors import ConfigurationError


class EvictingRedisError(ConfigurationError):
    """Redis may evict keys: afterwrite's streams would vanish under memory pressure."""


@dataclass(frozen=True)
class Memory:
    used_bytes: int
    max_bytes: int
    """0: no limit."""
    policy: str

    @property
    def used_share(self) -> float | None:
        return self.used_bytes / self.max_bytes if self.max_bytes else None


def memory(conn: redis.Redis) -> Memory:
    """From INFO memory, which needs no CONFIG permission (managed Redis often denies it)."""
    info: dict[str, Any] = conn.info("memory")
    return Memory(
        used_bytes=int(info.get("used_memory", 0)),
        max_bytes=int(info.get("maxmemory", 0)),
        policy=str(info.get("maxmemory_policy", "unknown")),
    )


def require_noeviction(conn: redis.Redis) -> Memory:
    found = memory(conn)
    if found.policy not in ("noeviction", "unknown"):
        raise EvictingRedisError(
            f"Redis has maxmemory-policy {found.policy}: under memory pressure it would delete "
            "whole streams and their consumer groups, records already reported as sent. Set "
            "maxmemory-policy noeviction (redis.conf, or CONFIG SET maxmemory-policy "
            "noeviction); afterwrite's producers spill before Redis fills up "
            "(AFTERWRITE_REDIS_MEMORY_HIGH_WATER)."
        )
    return found
