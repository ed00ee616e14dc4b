"""The synchronous producer used in request handlers.

``record_*`` never raises for Redis trouble and returns within its budget whatever Redis does:

- **direct** mode (``AFTERWRITE_PRODUCER_MODE=direct``, the default): one XADD per call, on the
  caller's thread, bounded by the socket timeouts (``AFTERWRITE_PRODUCER_TIMEOUT_MS`` for connect
  and for the command) on the first failing call, then answered at once while Redis stays away
  (see :mod:`afterwrite.producer.gate`). ``receipt.outcome`` is SENT when Redis has the entry.
- **background** mode: the call encodes the record and appends it to a bounded buffer
  (microseconds; outcome BUFFERED); a thread sends batches (:mod:`afterwrite.producer.pump`).

What Redis cannot take (unreachable, slower than the budget, stream over its cap, or the
background buffer full) goes to the spill journal on local disk (outcome SPILLED) and is
replayed when Redis takes entries again, by this process or a later one using the same spill
directory; if the journal cannot keep it either, it is DROPPED and counted. See
:class:`afterwrite.producer.records.ProducerStats` for the counters.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from afterwrite.core import wire
from afterwrite.core.settings import Settings, load_settings
from afterwrite.producer import lifecycle
from afterwrite.producer.api import RecordMethods
from afterwrite.producer.buffer import Buffer
from afterwrite.producer.gate import Gate
from afterwrite.producer.pump import Pump, spill_or_drop
from afterwrite.producer.records import RECEIPT_TYPES, Outcome, ProducerStats, Receipt
from afterwrite.producer.sender import REDIS_ERRORS, BatchSender
from afterwrite.producer.wiring import fresh_connection, has_segments, open_journal

__all__ = ["REDIS_ERRORS", "Client", "redis_options"]

_buffered = RECEIPT_TYPES[Outcome.BUFFERED]

# How much longer than the flush timeout close() waits for the thread's last round trip.
_JOIN_MARGIN_S = 1.0


def redis_options(settings: Settings, *, asyncio: bool = False) -> dict[str, Any]:
    """Connection options for a producer: strict timeouts, no silent retries. ``asyncio``:
    for a ``redis.asyncio`` client, which needs its own Retry class (redis-py 8.2 warns, and
    converts, when given the synchronous one)."""
    timeout_s = settings.producer_timeout_ms / 1000
    retry: Any = Retry
    if asyncio:
        from redis.asyncio.retry import Retry as retry  # only async clients load asyncio
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        "health_check_interval": 0,
    }


class Client(RecordMethods[Receipt]):
    """Thread-safe and fork-safe. Build one per process (or before forking) and share it."""

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self._redis = connection
        self._settings = settings
        self._init_redaction()
        self._prefix = settings.stream_prefix
        self._gate = Gate(
            max_entries=settings.stream_max_entries,
            cap_check_interval_s=settings.producer_cap_check_interval_s,
        )
        self.stats = ProducerStats()
        self._journal = open_journal(settings, connection.connection_pool.connection_kwargs)
        self._buffer: Buffer | None = None
        if settings.producer_mode == "background":
            self._buffer = Buffer(
                max_entries=settings.producer_buffer_max_entries,
                batch_entries=settings.producer_flush_max_entries,
                interval_s=settings.producer_flush_interval_ms / 1000,
            )
            self.stats.gauge("buffered", self._buffer.pending)
            self.stats.count_buffered_with(self._buffer.handed)
        self._sender = self._make_sender()
        self._pump = Pump(
            owner=self,
            buffer=self._buffer,
            sender=self._sender,
            gate=self._gate,
            journal=self._journal,
            stats=self.stats,
            batch_entries=settings.producer_flush_max_entries,
            replay_interval_s=settings.spill_replay_interval_s,
        )
        self._closed = False
        lifecycle.register(self)
        if self._buffer is not None or (
            self._journal is not None and has_segments(self._journal.directory)
        ):
            self._pump.ensure_started()

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> Client:
        """A client configured from ``AFTERWRITE_*`` variables (validated; SettingsError if bad),
        in the mode ``AFTERWRITE_PRODUCER_MODE`` names."""
        settings = settings or load_settings()
        conn = redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings))
        return cls(conn, settings)

    @property
    def mode(self) -> str:
        return "background" if self._buffer is not None else "direct"

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every record handed in before this call was sent to Redis, spilled, or
        (journal full) dropped and counted; False if that took longer than ``timeout_s``.
        Direct mode holds nothing back: True at once."""
        if self._buffer is None:
            return True
        self._pump.ensure_started()
        return self._buffer.flush(timeout_s)

    def close(self) -> None:
        """Flush (up to ``producer_exit_flush_timeout_s``), spill what is still buffered, stop
        the thread, close the journal and the connection. Idempotent; also run at exit."""
        if self._closed:
            return
        self._closed = True
        lifecycle.unregister(self)
        timeout_s = self._settings.producer_exit_flush_timeout_s
        if self._buffer is not None and not self.flush(timeout_s):
            left = self._buffer.take_all()
            spill_or_drop(self._journal, self.stats, left, "failed")
            self._buffer.settle(len(left))
        self._pump.stop(timeout_s + _JOIN_MARGIN_S)
        if self._journal is not None:
            self._journal.close()
        self._redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the hot path -------------------------------------------------------------------------
    def _record(self, kind: str, event_id: str, record: Any) -> Receipt:
        try:
            entry = wire.encode(record)
        except wire.EncodeError as exc:
            self._send_stand_in(kind, wire.unencodable(record, exc.detail))
            outcome = Outcome.INVALID
        else:
            buffer = self._buffer
            if buffer is None or self._closed:  # direct mode, or after close(): send now
                outcome = self._send(kind, entry)
            elif self._pump.running and buffer.put((kind, entry)):
                return _buffered(event_id)  # counted by the buffer
            else:
                outcome = self._enqueue(buffer, kind, entry)
                if outcome is Outcome.BUFFERED:
                    return _buffered(event_id)
        self.stats.count(outcome)
        return RECEIPT_TYPES[outcome](event_id)

    def _record_pair(
        self, kind: str, event_id: str, record: Any, kind2: str, record2: Any
    ) -> Receipt:
        receipt = self._record(kind, event_id, record)
        self._record(kind2, str(record2["id"]), record2)
        return receipt

    def _send_stand_in(self, kind: str, entry: bytes) -> None:
        """Send the stand-in of a record that could not be encoded the way any entry goes, so
        the worker dead-letters it with its reason and content (see wire.unencodable)."""
        buffer = self._buffer
        if buffer is None or self._closed:
            self._send(kind, entry)
        elif not (self._pump.running and buffer.put((kind, entry))):
            self._enqueue(buffer, kind, entry)

    def _enqueue(self, buffer: Buffer, kind: str, entry: bytes) -> Outcome:
        """The hot path's slow side: the thread is not running (first use after a fork), so
        start it and try again, or the buffer is full."""
        if not self._pump.running:
            self._pump.ensure_started()
            if buffer.put((kind, entry)):
                return Outcome.BUFFERED
        return self._spill(kind, entry, "buffer_full")

    def _send(self, kind: str, entry: bytes) -> Outcome:
        stream = wire.stream_key(self._prefix, kind)
        refused, check_length = self._gate.admit(stream)
        if refused is None:
            try:
                if check_length:
                    # Once per cap_check_interval_s: add only if the stream has room (one
                    # round trip, like the XADD it replaces), and learn its length.
                    added, length = self._sender.add(stream, [entry], one_round_trip=True)
                    if added:
                        return self._gate.sent(stream, length)
                    refused = self._gate.over_cap(stream)
                else:
                    self._redis.xadd(stream, {wire.PAYLOAD_FIELD: entry})
                    return self._gate.sent(stream, None)
            except REDIS_ERRORS as exc:
                refused = self._gate.failed(exc)
        return self._spill(kind, entry, refused.value)

    def _spill(self, kind: str, entry: bytes, reason: str) -> Outcome:
        """Counts the reason; the caller's stats.count(outcome) counts spilled/dropped."""
        self.stats.add(reason)
        if self._journal is not None and self._journal.append(kind, entry):
            if not self._pump.running:
                self._pump.ensure_started()  # to replay it
            return Outcome.SPILLED
        return Outcome.DROPPED

    # --- process lifecycle (afterwrite.producer.lifecycle) ---------------------------------
    def _after_fork_in_child(self) -> None:
        self._gate.reset_after_fork()
        self.stats.reset_after_fork()
        if self._buffer is not None:
            self._buffer.reset_after_fork()
        if self._journal is not None:
            self._journal.reset_after_fork()
        # New connections (and the script registered on them): see fresh_connection.
        self._redis = fresh_connection(self._redis)
        self._sender = self._make_sender()
        self._pump.reset_after_fork(self._sender)

    def _at_exit(self) -> None:
        self.close()

    def _make_sender(self) -> BatchSender:
        return BatchSender(
            self._redis,
            self._gate,
            prefix=self._prefix,
            max_entries=self._settings.stream_max_entries,
            high_water=self._settings.redis_memory_high_water,
        )
