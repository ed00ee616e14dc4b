"""The asyncio producer: the same contract as :class:`producer.Client` in direct mode, awaited.

``await client.record_query(...)`` never raises for Redis trouble and is bounded by the same
socket timeouts; it yields to the event loop while Redis answers. What Redis cannot take goes
to the same spill journal as the sync client's (a ``write(2)`` of a few microseconds, done on
the loop: a thread hop would cost more than the write), and a task on the client's loop
replays it when Redis is back (its file reads and fsyncs in a worker thread).

Always direct: ``AFTERWRITE_PRODUCER_MODE=background`` applies to :class:`producer.Client`
only. An awaited XADD already leaves the loop free for other requests while Redis answers; a
buffer would save the awaiting request tens of microseconds but add a second flusher design
(task or thread) whose failure modes (loop closed with entries buffered) are worse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

from afterwrite.core import wire
from afterwrite.core.settings import Settings, load_settings
from afterwrite.producer import lifecycle
from afterwrite.producer.api import RecordMethods
from afterwrite.producer.client import REDIS_ERRORS, redis_options
from afterwrite.producer.gate import Gate
from afterwrite.producer.records import Outcome, ProducerStats, Receipt
from afterwrite.producer.sender import (
    BATCH_SCRIPT,
    CALL_MAX_BYTES,
    Item,
    accepted_prefix,
    entries_of,
    group_by_stream,
    read_reply,
    script_args,
    settle,
    split_by_bytes,
)
from afterwrite.producer.wiring import has_segments, open_journal
from afterwrite.spill.journal import SpillJournal

log = logging.getLogger("afterwrite.producer")


class AsyncClient(RecordMethods[Coroutine[Any, Any, Receipt]]):
    """Direct mode with the spill journal; use it from one event loop (the replay task runs
    on the loop of the call that first needed it)."""

    def __init__(self, connection: aioredis.Redis, settings: Settings) -> None:
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
        self._script = connection.register_script(BATCH_SCRIPT)
        self._use_script = True
        self._replayer: asyncio.Task[None] | None = None
        self._leftovers = self._journal is not None and has_segments(self._journal.directory)
        if settings.producer_mode == "background":
            log.info(
                "AsyncClient sends directly (awaited XADD); producer_mode=background applies "
                "to the sync Client only",
                extra={"action": "async_direct"},
            )
        lifecycle.register(self)

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> AsyncClient:
        settings = settings or load_settings()
        conn = aioredis.Redis.from_url(
            settings.require_redis_url(), **redis_options(settings, asyncio=True)
        )
        return cls(conn, settings)

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Nothing is held back in direct mode: True at once."""
        return True

    async def close(self) -> None:
        """Stop replaying, close the journal and the connection. Spilled entries not yet
        replayed stay on disk for the next process."""
        lifecycle.unregister(self)
        task, self._replayer = self._replayer, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._journal is not None:
            self._journal.close()
        await self._redis.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the hot path -------------------------------------------------------------------------
    async def _record_pair(
        self, kind: str, event_id: str, record: Any, kind2: str, record2: Any
    ) -> Receipt:
        receipt = await self._record(kind, event_id, record)
        await self._record(kind2, str(record2["id"]), record2)
        return receipt

    async def _record(self, kind: str, event_id: str, record: Any) -> Receipt:
        try:
            entry = wire.encode(record)
        except wire.EncodeError as exc:
            # the stand-in carries it to the dead letters; the caller's receipt says invalid
            await self._send(kind, wire.unencodable(record, exc.detail))
            outcome = Outcome.INVALID
        else:
            outcome = await self._send(kind, entry)
        if self._leftovers:
            self._ensure_replayer()
        self.stats.count(outcome)
        return Receipt(event_id, outcome)

    async def _send(self, kind: str, entry: bytes) -> Outcome:
        stream = wire.stream_key(self._prefix, kind)
        refused, check_length = self._gate.admit(stream)
        if refused is None:
            try:
                if check_length:  # see Client._send: add only if there is room
                    added, length = await self._add(stream, [entry], one_round_trip=True)
                    if added:
                        return self._gate.sent(stream, length)
                    refused = self._gate.over_cap(stream)
                else:
                    await self._redis.xadd(stream, {wire.PAYLOAD_FIELD: entry})
                    return self._gate.sent(stream, None)
            except REDIS_ERRORS as exc:
                refused = self._gate.failed(exc)
        self.stats.add(refused.value)
        if self._journal is not None and self._journal.append(kind, entry):
            self._leftovers = True
            self._ensure_replayer()
            return Outcome.SPILLED
        return Outcome.DROPPED

    # --- replay, as a task on the client's loop -----------------------------------------------
    def _ensure_replayer(self) -> None:
        if self._replayer is None or self._replayer.done():
            self._replayer = asyncio.get_running_loop().create_task(
                self._replay_loop(), name="afterwrite-replay"
            )

    async def _replay_loop(self) -> None:
        # File reads and fsyncs run in a worker thread: an fsync can take milliseconds, which
        # the loop's other requests would wait for.
        journal = self._journal
        assert journal is not None
        chunk_entries = self._settings.producer_flush_max_entries
        interval_s = self._settings.spill_replay_interval_s
        while True:
            if not self._gate.shut and (not self._gate.failing or await self._probe()):
                chunk = await asyncio.to_thread(journal.next_chunk, chunk_entries)
                if chunk is None:
                    self._leftovers = False
                    await asyncio.to_thread(journal.sync)
                    return  # started again on the next spill
                accepted = accepted_prefix(await self._send_batch(chunk.entries))
                journal.commit(chunk, accepted)
                self.stats.add("replayed", accepted)
                if accepted == len(chunk.entries):
                    continue
            await asyncio.to_thread(journal.sync)
            await asyncio.sleep(interval_s)

    async def _probe(self) -> bool:
        try:
            await self._redis.ping()
        except REDIS_ERRORS as exc:
            self._gate.failed(exc)
            return False
        self._gate.reachable()
        return True

    async def _add(
        self, stream: str, entries: list[bytes], *, one_round_trip: bool = False
    ) -> tuple[int, int]:
        """The asyncio twin of :meth:`afterwrite.producer.sender.BatchSender.add`."""
        total = length = 0
        for run in split_by_bytes(entries, CALL_MAX_BYTES):
            added, length = await self._add_run(stream, run, one_round_trip)
            total += added
            if added < len(run):
                break
        return total, length

    async def _add_run(
        self, stream: str, entries: list[bytes], one_round_trip: bool
    ) -> tuple[int, int]:
        max_entries = self._settings.stream_max_entries
        if self._use_script:
            try:
                high_water = self._settings.redis_memory_high_water
                args = script_args(max_entries, high_water, entries)
                reply: Any = await (
                    self._redis.eval(BATCH_SCRIPT, 1, stream, *args)
                    if one_round_trip
                    else self._script(keys=[stream], args=args)
                )
                return read_reply(self._gate, stream, reply)
            except redis.ResponseError as exc:
                await self._redis.xlen(stream)  # Redis answers plain commands: no scripting
                self._use_script = False
                log.warning(
                    "redis refuses the batch script (%s); sending pipelined XADDs instead",
                    exc,
                    extra={"action": "no_script"},
                )
        fits = entries[: max(0, max_entries - int(await self._redis.xlen(stream)))]
        pipe = self._redis.pipeline(transaction=False)
        for entry in fits:
            pipe.xadd(stream, {wire.PAYLOAD_FIELD: entry})
        pipe.xlen(stream)
        replies = await pipe.execute()
        return len(fits), int(replies[-1])

    async def _send_batch(self, items: Sequence[Item]) -> list[Outcome]:
        """The asyncio twin of :meth:`afterwrite.producer.sender.BatchSender.send`."""
        results = [Outcome.SENT] * len(items)
        failed = False
        for stream, idx in group_by_stream(items, self._prefix).items():
            refused = Outcome.FAILED if failed else self._gate.admit(stream)[0]
            if refused is None:
                try:
                    added, length = await self._add(stream, entries_of(items, idx))
                except REDIS_ERRORS as exc:
                    refused = self._gate.failed(exc)
                    failed = True
                else:
                    settle(self._gate, stream, idx, added, length, results)
                    continue
            for i in idx:
                results[i] = refused
        return results

    # --- process lifecycle (afterwrite.producer.lifecycle) ---------------------------------
    def _after_fork_in_child(self) -> None:
        self._gate.reset_after_fork()
        self.stats.reset_after_fork()
        if self._journal is not None:
            self._journal.reset_after_fork()
        self._replayer = None  # belonged to the parent's loop

    def _at_exit(self) -> None:
        if self._journal is not None:
            self._journal.close()

    @property
    def journal(self) -> SpillJournal | None:
        return self._journal
