"""The producer's one background thread: sends buffered batches, replays the spill journal,
fsyncs it.

Background mode starts it with the client; direct mode starts it on the first spill (or at once
when an earlier process left spilled entries), so a direct client that never spills runs no
thread. It never touches the request path: request threads only append to the buffer or the
journal. Replay yields to buffered batches (a slice of at most :data:`REPLAY_SLICE_S` when
one is due) and is retried every ``replay_interval_s`` while Redis refuses (down or over cap).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from afterwrite.producer.buffer import Buffer, Item
from afterwrite.producer.gate import Gate
from afterwrite.producer.records import Outcome, ProducerStats
from afterwrite.producer.sender import accepted_prefix
from afterwrite.spill.journal import SpillJournal

log = logging.getLogger("afterwrite.producer")

REPLAY_SLICE_S = 0.05
SYNC_INTERVAL_S = 1.0
IDLE_WAIT_S = 0.25
"""The longest the thread sleeps, so a stop or a due replay is noticed quickly."""

_REASON = {Outcome.FAILED: "failed", Outcome.OVER_CAP: "over_cap"}


class Sender(Protocol):
    """What the pump needs of :class:`afterwrite.producer.sender.BatchSender` (a fake in unit
    tests)."""

    def send(self, items: Sequence[Item]) -> list[Outcome]: ...

    def probe(self) -> bool: ...


def spill_or_drop(
    journal: SpillJournal | None, stats: ProducerStats, items: Sequence[Item], reason: str
) -> int:
    """Keep ``items`` (that Redis did not take, for ``reason``) in the journal; count them.
    Returns how many were kept; the rest are dropped."""
    stats.add(reason, len(items))
    kept = journal.append_many(items) if journal is not None and items else 0
    stats.add("spilled", kept)
    stats.add("dropped", len(items) - kept)
    return kept


def next_replay_at(now: float, *, replayed_all: bool, sliced: bool, interval_s: float) -> float:
    """When to try replaying again: at once if only the time slice ended, else after the
    interval (the journal is empty, or Redis refused: down or over cap)."""
    return now if sliced and not replayed_all else now + interval_s


class Pump:
    def __init__(
        self,
        *,
        owner: Any,
        buffer: Buffer | None,
        sender: Sender,
        gate: Gate,
        journal: SpillJournal | None,
        stats: ProducerStats,
        batch_entries: int,
        replay_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._owner = owner  # a running pump keeps its client alive (and flushed at exit)
        self._buffer = buffer
        self._sender = sender
        self._gate = gate
        self._journal = journal
        self._stats = stats
        self._batch = batch_entries
        self._replay_interval_s = replay_interval_s
        self._clock = clock
        self.reset_after_fork()

    def reset_after_fork(self, sender: Sender | None = None) -> None:
        """No thread runs in a forked child; the next :meth:`ensure_started` starts one, with
        ``sender`` (the child's own connections)."""
        if sender is not None:
            self._sender = sender
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._start_lock = threading.Lock()
        self._replay_at = 0.0
        self._sync_at = 0.0
        self.running = False

    def ensure_started(self) -> None:
        if self.running:
            return
        with self._start_lock:
            if self.running or self._stop.is_set():
                return
            self._thread = threading.Thread(
                target=self._run, name="afterwrite-producer", daemon=True
            )
            self._thread.start()
            self.running = True

    def stop(self, timeout_s: float) -> None:
        """Ask the thread to end and wait up to ``timeout_s`` for it."""
        self._stop.set()
        if self._buffer is not None:
            self._buffer.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    # --- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        failing = False
        try:
            while not self._stop.is_set():
                try:
                    self.step()
                    failing = False
                except Exception:  # a disk error or a bug: log it once, pause, carry on
                    if not failing:
                        log.exception("afterwrite producer thread", extra={"action": "pump_error"})
                    failing = True
                    self._stop.wait(self._replay_interval_s)
        finally:
            self.running = False
            self._owner = None

    def step(self) -> None:
        """One round: a due batch, then replay and fsync when due. Public for tests."""
        now = self._clock()
        idle_s = IDLE_WAIT_S
        if self._journal is not None:
            idle_s = max(0.0, min(idle_s, self._replay_at - now, self._sync_at - now))
        if self._buffer is not None:
            batch = self._buffer.take(idle_s)
            if batch:
                self.deliver(batch)
        elif idle_s > 0:
            self._stop.wait(idle_s)
        now = self._clock()
        if self._journal is not None and now >= self._replay_at:
            self.replay()
        if self._journal is not None and now >= self._sync_at:
            self._sync_at = now + SYNC_INTERVAL_S
            self._journal.sync()

    def deliver(self, batch: list[Item]) -> None:
        """Send one batch; spill what Redis did not take. Settles the batch in the buffer."""
        try:
            try:
                results = self._sender.send(batch)
            except Exception:  # not Redis trouble (send reports that): keep the batch anyway
                spill_or_drop(self._journal, self._stats, batch, "failed")
                raise
            sent = results.count(Outcome.SENT)
            self._stats.add("sent", sent)
            if sent < len(batch):
                refused: dict[Outcome, list[Item]] = {}
                for item, result in zip(batch, results, strict=True):
                    if result is not Outcome.SENT:
                        refused.setdefault(result, []).append(item)
                for result, items in refused.items():
                    spill_or_drop(self._journal, self._stats, items, _REASON[result])
        finally:
            if self._buffer is not None:
                self._buffer.settle(len(batch))

    def replay(self) -> int:
        """Replay spilled entries for up to a time slice; returns how many Redis took."""
        journal = self._journal
        if journal is None or self._gate.shut or (self._gate.failing and not self._sender.probe()):
            self._replay_at = self._clock() + self._replay_interval_s
            return 0
        started = self._clock()
        total = 0
        while True:
            n, more = journal.replay_once(self._send_replay, self._batch)
            total += n
            now = self._clock()
            sliced = more and (
                (now - started >= REPLAY_SLICE_S and self._batch_waiting()) or self._stop.is_set()
            )
            if not more or sliced:
                self._replay_at = next_replay_at(
                    now, replayed_all=not more, sliced=sliced, interval_s=self._replay_interval_s
                )
                return total

    def _send_replay(self, entries: list[Item]) -> int:
        accepted = accepted_prefix(self._sender.send(entries))
        self._stats.add("replayed", accepted)
        return accepted

    def _batch_waiting(self) -> bool:
        return self._buffer is not None and self._buffer.pending() > 0
