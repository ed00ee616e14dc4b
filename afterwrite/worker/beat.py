"""Beat's scheduler: celery-redbeat (JSON state in Redis, a lock for one active beat), made to
wait out a Redis that refuses it instead of exiting.

RedBeat reads its schedule in a MULTI transaction, which a Redis over ``maxmemory`` refuses
whole, and beat then exited: no more kicks, so no drain freed the memory. Here a tick that
Redis refuses (full, read-only after a failover, or away) is logged once and retried a second
later; beat carries on when Redis does. Losing the lock is not waited out: that beat exits,
and its supervisor starts one that queues for the lock behind the beat now holding it.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from redbeat.schedulers import RedBeatScheduler

log = logging.getLogger("afterwrite.beat")

RETRY_S = 1.0
NAME = "afterwrite.worker.beat:Scheduler"


class Scheduler(RedBeatScheduler):  # type: ignore[misc]
    _refused: str | None = None

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            interval: float = super().tick(*args, **kwargs)
        except redis.exceptions.LockError:
            raise
        except (redis.RedisError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if self._refused is None:
                log.warning("beat: Redis refuses the schedule (%s); retrying every %.0fs",
                            reason, RETRY_S)  # fmt: skip
            self._refused = reason
            return RETRY_S
        if self._refused is not None:
            log.info("beat: Redis takes the schedule again")
            self._refused = None
        return interval
