"""What a failure means, as a value: retry it, dead-letter it, or stop and fix the setup.

:func:`classify` reads afterwrite's own bases first (:mod:`afterwrite.core.errors`), then one
table for the exceptions of the libraries underneath: PostgreSQL SQLSTATEs and redis errors.
Anything else is transient: retrying an unknown failure with backoff loses nothing.
"""

from __future__ import annotations

import enum

import psycopg
import redis

from afterwrite.core.errors import ConfigurationError, Error, PoisonError, TransientError


class BadDeployError(ConfigurationError, RuntimeError):
    """Nearly a whole batch is invalid: a configuration problem, not poison data."""


class Failure(enum.Enum):
    TRANSIENT = "transient"
    """The service is away or overloaded: leave entries unacknowledged, retry with backoff."""
    POISON = "poison"
    """This data can never be stored: dead-letter it, never retry."""
    CONFIGURATION = "configuration"
    """Wrong schema, permissions or settings: stop loudly; retrying cannot help."""


# SQLSTATE classes caused by a row's content: 22 data exception, 23 integrity violation; plus
# 54000 program limit exceeded (e.g. an index row too large) and P0001 raised by a trigger.
_POISON_CLASSES = frozenset({"22", "23"})
_POISON_STATES = frozenset({"54000", "P0001"})
# 42 syntax error or access rule violation (undefined table/column, permission denied),
# 3F invalid schema name, 28 invalid authorization: the setup is wrong.
_CONFIG_CLASSES = frozenset({"42", "3F", "28"})

# redis errors, most specific first (several are subclasses of ResponseError or ConnectionError).
# A replica promoted after a failover answers READONLY until the client reconnects, TRYAGAIN
# during a slot migration, LOADING while it reads its dataset, OOM until memory frees: all pass.
# A wrong password or a missing ACL permission does not; nor does any other error reply
# (WRONGTYPE: a key of ours holds something else).
_REDIS_TABLE: tuple[tuple[type[BaseException], Failure], ...] = (
    (redis.exceptions.ReadOnlyError, Failure.TRANSIENT),
    (redis.exceptions.TryAgainError, Failure.TRANSIENT),
    (redis.exceptions.BusyLoadingError, Failure.TRANSIENT),
    (redis.exceptions.OutOfMemoryError, Failure.TRANSIENT),
    (redis.exceptions.ClusterDownError, Failure.TRANSIENT),
    (redis.exceptions.AuthenticationError, Failure.CONFIGURATION),
    (redis.exceptions.AuthorizationError, Failure.CONFIGURATION),
    (redis.exceptions.NoPermissionError, Failure.CONFIGURATION),
    (redis.exceptions.ResponseError, Failure.CONFIGURATION),
)


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, ConfigurationError):
        return Failure.CONFIGURATION
    if isinstance(exc, PoisonError):
        return Failure.POISON
    if isinstance(exc, TransientError):
        return Failure.TRANSIENT
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate or ""
        if state[:2] in _POISON_CLASSES or state in _POISON_STATES:
            return Failure.POISON
        if state[:2] in _CONFIG_CLASSES:
            return Failure.CONFIGURATION
        return Failure.TRANSIENT
    for kind, failure in _REDIS_TABLE:
        if isinstance(exc, kind):
            return failure
    return Failure.TRANSIENT


def is_explained(exc: BaseException) -> bool:
    """Whether ``exc`` says what failed: afterwrite's own errors, a database's, Redis's, the
    operating system's. Anything else (a RecursionError, a TypeError from deep inside a
    library) is tied to some entry's content, and the drain bisects its batch to find it
    rather than retry the whole batch forever."""
    return isinstance(exc, Error | psycopg.Error | redis.RedisError | OSError)
