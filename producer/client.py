"""The synchronous producer used in request handlers (direct mode).

``record_*`` never raises for Redis trouble and never blocks longer than about two socket
timeouts (connect + command, ``AFTERWRITE_PRODUCER_TIMEOUT_MS`` each) on the first failing call,
then returns at once while Redis stays away (see :mod:`producer.gate`). Its result is the event
id; ``receipt.outcome`` says whether Redis took the entry.

Seam for later modes: everything that talks to Redis is :meth:`Client._send`; a background
buffer or a spill journal replaces or wraps it without touching the ``record_*`` methods.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from afterwrite import wire
from afterwrite.settings import Settings, load_settings
from producer.api import RecordMethods
from producer.gate import Gate
from producer.records import Outcome, ProducerStats, Receipt

REDIS_ERRORS = (redis.RedisError, OSError)


def redis_options(settings: Settings) -> dict[str, Any]:
    """Connection options for a producer: strict timeouts, no silent retries."""
    timeout_s = settings.producer_timeout_ms / 1000
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        "health_check_interval": 0,
    }


class Client(RecordMethods[Receipt]):
    """Records go straight to Redis with one XADD each. Thread-safe."""

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self._redis = connection
        self._settings = settings
        self._gate = Gate(
            max_entries=settings.stream_max_entries,
            cap_check_interval_s=settings.producer_cap_check_interval_s,
        )
        self.stats = ProducerStats()

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> Client:
        """A client configured from ``AFTERWRITE_*`` variables (validated; SettingsError if bad)."""
        settings = settings or load_settings()
        conn = redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings))
        return cls(conn, settings)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Direct mode holds nothing back; True. (Background mode waits for its buffer.)"""
        return True

    def close(self) -> None:
        self._redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record(self, kind: str, record: dict[str, Any]) -> Receipt:
        event_id = str(record["id"])
        try:
            entry = wire.encode(record)
        except wire.EncodeError:
            outcome = Outcome.INVALID
        else:
            outcome = self._send(wire.stream_key(self._settings.stream_prefix, kind), entry)
        self.stats.count(outcome)
        return Receipt(event_id, outcome)

    def _send(self, stream: str, entry: bytes) -> Outcome:
        refused, check_length = self._gate.admit(stream)
        if refused is not None:
            return refused
        try:
            if check_length:
                pipe = self._redis.pipeline(transaction=False)
                pipe.xadd(stream, {wire.PAYLOAD_FIELD: entry})
                pipe.xlen(stream)
                _, length = pipe.execute()
                return self._gate.sent(stream, int(length))
            self._redis.xadd(stream, {wire.PAYLOAD_FIELD: entry})
            return self._gate.sent(stream, None)
        except REDIS_ERRORS as exc:
            return self._gate.failed(exc)
