"""The asyncio producer: the same contract as :class:`producer.Client`, awaited.

``await client.record_query(...)`` never raises for Redis trouble and is bounded by the same
socket timeouts; it yields to the event loop while Redis answers.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis

from afterwrite import wire
from afterwrite.settings import Settings, load_settings
from producer.api import RecordMethods
from producer.client import REDIS_ERRORS, redis_options
from producer.gate import Gate
from producer.records import Outcome, ProducerStats, Receipt


class AsyncClient(RecordMethods[Coroutine[Any, Any, Receipt]]):
    def __init__(self, connection: aioredis.Redis, settings: Settings) -> None:
        self._redis = connection
        self._settings = settings
        self._gate = Gate(
            max_entries=settings.stream_max_entries,
            cap_check_interval_s=settings.producer_cap_check_interval_s,
        )
        self.stats = ProducerStats()

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> AsyncClient:
        settings = settings or load_settings()
        conn = aioredis.Redis.from_url(settings.require_redis_url(), **redis_options(settings))
        return cls(conn, settings)

    async def flush(self, timeout_s: float = 5.0) -> bool:
        return True

    async def close(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _record(self, kind: str, record: dict[str, Any]) -> Receipt:
        event_id = str(record["id"])
        try:
            entry = wire.encode(record)
        except wire.EncodeError:
            outcome = Outcome.INVALID
        else:
            outcome = await self._send(wire.stream_key(self._settings.stream_prefix, kind), entry)
        self.stats.count(outcome)
        return Receipt(event_id, outcome)

    async def _send(self, stream: str, entry: bytes) -> Outcome:
        refused, check_length = self._gate.admit(stream)
        if refused is not None:
            return refused
        try:
            if check_length:
                pipe = self._redis.pipeline(transaction=False)
                pipe.xadd(stream, {wire.PAYLOAD_FIELD: entry})
                pipe.xlen(stream)
                _, length = await pipe.execute()
                return self._gate.sent(stream, int(length))
            await self._redis.xadd(stream, {wire.PAYLOAD_FIELD: entry})
            return self._gate.sent(stream, None)
        except REDIS_ERRORS as exc:
            return self._gate.failed(exc)
