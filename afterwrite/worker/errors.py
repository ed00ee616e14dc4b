"""What a failure means, as a value: retry it, dead-letter it, or stop and fix the setup."""

from __future__ import annotations

import enum

import psycopg
import redis

from afterwrite.core.kinds import UnknownKindError


class BadDeployError(RuntimeError):
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


def classify(exc: BaseException) -> Failure:
    from afterwrite.embedders.providers import ProviderConfigError

    if isinstance(exc, UnknownKindError | BadDeployError | ProviderConfigError):
        return Failure.CONFIGURATION
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate or ""
        if state[:2] in _POISON_CLASSES or state in _POISON_STATES:
            return Failure.POISON
        if state[:2] in _CONFIG_CLASSES:
            return Failure.CONFIGURATION
        return Failure.TRANSIENT
    if isinstance(exc, redis.AuthenticationError | redis.ResponseError):
        return Failure.CONFIGURATION
    return Failure.TRANSIENT
