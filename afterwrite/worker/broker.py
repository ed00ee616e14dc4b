"""kombu's Redis transport, with a full or read-only Redis counted as a lost connection.

kombu counts only connection-level errors as ``connection_errors``. Out of memory, the worker
pops a task message and then fails to record it as unacknowledged (ZADD, HSET are refused):
kombu raised ``OutOfMemoryError`` as an unrecoverable error and the worker exited, so nothing
drained and the memory never freed. After a failover a replica answers READONLY until the
client reconnects. Counted as connection errors, both make Celery reconnect with its backoff
and carry on; the message lost with it is a kick, which beat sends again.
"""

from __future__ import annotations

import redis
from kombu.transport import redis as kombu_redis

NAME = "afterwrite.worker.broker:Transport"


class Transport(kombu_redis.Transport):
    connection_errors = (
        *kombu_redis.Transport.connection_errors,
        redis.exceptions.OutOfMemoryError,
        redis.exceptions.ReadOnlyError,
    )
