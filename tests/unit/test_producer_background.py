"""Background mode's pieces without Redis: the buffer, the pump's decisions, the counters.

The pump is driven step by step with an injected clock and a scripted sender, against a real
spill journal in a temporary directory.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from afterwrite.producer.buffer import Buffer, batch_wait_s
from afterwrite.producer.gate import RETRY_AFTER_FAILURE_S, Gate
from afterwrite.producer.pump import Pump, next_replay_at
from afterwrite.producer.records import Outcome, ProducerStats
from afterwrite.producer.sender import accepted_prefix, split_by_bytes
from afterwrite.spill.journal import SpillJournal, room_for

Item = tuple[str, bytes]


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class ScriptedSender:
    """Answers like BatchSender: per entry SENT / FAILED / OVER_CAP, as told."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.mode = "up"
        self.room = 10**9
        self.received: list[Item] = []
        self.calls = 0

    def probe(self) -> bool:
        if self.mode == "down":
            self.gate.failed(ConnectionError("down"))
            return False
        self.gate.reachable()
        return True

    def send(self, items: Sequence[Item]) -> list[Outcome]:
        if self.gate.shut:  # BatchSender asks the gate first: no round trip
            return [Outcome.FAILED] * len(items)
        self.calls += 1
        if self.mode == "down":
            self.gate.failed(ConnectionError("down"))
            return [Outcome.FAILED] * len(items)
        took = list(items[: self.room])
        self.room -= len(took)
        self.received.extend(took)
        return [Outcome.SENT] * len(took) + [Outcome.OVER_CAP] * (len(items) - len(took))


def test_batch_wait_decisions() -> None:
    def wait(n: int, now: float, *, urgent: bool = False) -> float:
        return batch_wait_s(n, 5.02, now, batch=100, urgent=urgent)  # next tick at 5.02

    assert wait(100, 5.0) == 0.0  # a full batch goes at once
    assert wait(1, 5.0, urgent=True) == 0.0  # so does anything while flush() waits
    assert wait(1, 5.01) == pytest.approx(0.01)  # else: at the tick
    assert wait(0, 5.01) == pytest.approx(0.01)
    assert wait(1, 5.02) == 0.0
    assert wait(0, 5.02) == math.inf  # a tick with nothing to send


def test_small_pure_rules() -> None:
    assert room_for([10, 10, 10], 25) == 2
    assert room_for([30], 25) == 0
    assert accepted_prefix([Outcome.SENT, Outcome.SENT, Outcome.OVER_CAP, Outcome.SENT]) == 2
    assert next_replay_at(10.0, replayed_all=True, sliced=False, interval_s=1.0) == 11.0
    assert next_replay_at(10.0, replayed_all=False, sliced=True, interval_s=1.0) == 10.0
    assert next_replay_at(10.0, replayed_all=False, sliced=False, interval_s=1.0) == 11.0


def test_batches_are_split_into_calls_of_bounded_size() -> None:
    entries = [b"a" * 10, b"b" * 10, b"c" * 25, b"d" * 5, b"e" * 5]
    assert split_by_bytes(entries, 100) == [entries]
    assert split_by_bytes(entries, 20) == [entries[:2], entries[2:3], entries[3:]]
    assert split_by_bytes(entries, 1) == [[e] for e in entries]  # one entry per call at least
    assert split_by_bytes([], 10) == [[]]


def test_buffer_is_bounded_and_batches_by_size_and_age() -> None:
    clock = Clock()
    buf = Buffer(max_entries=5, batch_entries=2, interval_s=0.02, clock=clock)
    assert all(buf.put(("query", bytes([i]))) for i in range(5))
    assert not buf.put(("query", b"x"))  # full: the caller spills it itself, at once
    assert buf.take(0) == [("query", b"\x00"), ("query", b"\x01")]
    assert not buf.put(("query", b"x"))  # taken but not settled still counts
    buf.settle(2)
    assert buf.put(("query", b"\x05"))
    assert buf.take(0) == [("query", b"\x02"), ("query", b"\x03")]
    assert buf.take(0) == [("query", b"\x04"), ("query", b"\x05")]
    buf.settle(4)
    clock.now += 1.0
    assert buf.take(0) == []  # a tick with nothing to send
    assert buf.put(("query", b"\x06"))
    assert buf.take(0) == []  # waits for the next tick, 20 ms on
    clock.now += 0.02
    assert buf.take(0) == [("query", b"\x06")]
    assert buf.pending() == 1


def test_flush_waits_until_settled_and_times_out_otherwise() -> None:
    buf = Buffer(max_entries=10, batch_entries=10, interval_s=60.0)
    buf.put(("query", b"a"))
    assert not buf.flush(0.05)  # nobody takes it

    def flusher() -> None:
        batch = buf.take(5.0)  # due at once: a flush is waiting, whatever the interval
        buf.settle(len(batch))

    t = threading.Thread(target=flusher)
    t.start()
    assert buf.flush(5.0)
    t.join()
    assert buf.pending() == 0


def test_concurrent_puts_are_each_taken_once_and_the_bound_holds() -> None:
    """put takes no lock: many request threads against a flusher taking and settling
    batches. Every accepted entry is taken exactly once, refused ones are not, and what is
    held never exceeds the bound by more than one entry per racing thread."""
    threads, per_thread, bound = 8, 5_000, 300
    buf = Buffer(max_entries=bound, batch_entries=50, interval_s=0.001)
    taken: list[Item] = []
    accepted: list[list[Item]] = [[] for _ in range(threads)]
    peak = [0]
    done = threading.Event()

    def flusher() -> None:
        while not (done.is_set() and buf.pending() == 0):
            peak[0] = max(peak[0], buf.pending())
            batch = buf.take(0.01)
            taken.extend(batch)
            buf.settle(len(batch))

    def producer(n: int) -> None:
        for i in range(per_thread):
            item = ("query", f"{n}:{i}".encode())
            if buf.put(item):
                accepted[n].append(item)

    consumer = threading.Thread(target=flusher)
    consumer.start()
    workers = [threading.Thread(target=producer, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    done.set()
    consumer.join(30)
    assert not consumer.is_alive()
    everything = [item for items in accepted for item in items]
    assert sorted(taken) == sorted(everything)  # each accepted entry once, nothing else
    assert len(set(taken)) == len(taken)
    assert 0 < len(everything) < threads * per_thread  # the bound refused some
    assert peak[0] <= bound + threads
    assert buf.handed() == len(everything)
    for n in range(threads):  # one thread's entries keep their order
        mine = [item for item in taken if item[1].startswith(f"{n}:".encode())]
        assert mine == accepted[n]


def make_pump(tmp_path: Path, clock: Clock) -> tuple[Pump, Buffer, ScriptedSender, ProducerStats]:
    gate = Gate(max_entries=10**9, cap_check_interval_s=1.0, clock=clock)
    sender = ScriptedSender(gate)
    stats = ProducerStats()
    buf = Buffer(max_entries=1000, batch_entries=10, interval_s=0.01, clock=clock)
    journal = SpillJournal(tmp_path, max_bytes=10_000_000)
    pump = Pump(
        owner=None,
        buffer=buf,
        sender=sender,
        gate=gate,
        journal=journal,
        stats=stats,
        batch_entries=10,
        replay_interval_s=1.0,
        clock=clock,
    )
    return pump, buf, sender, stats


def test_pump_spills_while_down_and_replays_once_redis_is_back(tmp_path: Path) -> None:
    clock = Clock()
    pump, buf, sender, stats = make_pump(tmp_path, clock)
    sender.mode = "down"
    items = [("query", f"e{i}".encode()) for i in range(25)]
    for item in items:
        buf.put(item)
    for _ in range(3):
        pump.step()
        clock.now += 0.01
    assert sender.calls == 1  # after the first failure the gate is shut: no more tries
    assert stats.snapshot()["spilled"] == 25
    assert stats.snapshot()["failed"] == 25
    assert buf.pending() == 0

    sender.mode = "up"
    pump.step()
    assert stats.snapshot()["replayed"] == 0  # the gate is still shut
    clock.now += RETRY_AFTER_FAILURE_S
    pump.step()
    assert sender.received == items  # in order, each once
    snap = stats.snapshot()
    assert (snap["replayed"], snap["dropped"], snap["sent"]) == (25, 0, 0)
    pump.step()
    assert sender.received == items


def test_pump_spills_what_is_over_cap_and_retries_after_the_interval(tmp_path: Path) -> None:
    clock = Clock()
    pump, buf, sender, stats = make_pump(tmp_path, clock)
    sender.room = 4
    items = [("query", f"e{i}".encode()) for i in range(10)]
    for item in items:
        buf.put(item)
    pump.step()
    snap = stats.snapshot()
    assert (snap["sent"], snap["spilled"], snap["over_cap"]) == (4, 6, 6)
    sender.room = 3  # the stream drained a little
    clock.now += 1.0
    pump.step()
    assert stats.snapshot()["replayed"] == 3
    calls = sender.calls
    pump.step()
    assert sender.calls == calls  # refused last time: wait for the interval
    sender.room = 100
    clock.now += 1.0
    pump.step()
    assert sender.received == items  # nothing twice, nothing lost
    assert stats.snapshot()["replayed"] == 6


def test_gate_learns_of_a_full_stream_from_a_batch_and_of_recovery_from_a_probe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "afterwrite.producer")
    clock = Clock()
    gate = Gate(max_entries=10, cap_check_interval_s=1.0, clock=clock)
    assert gate.over_cap("s") is Outcome.OVER_CAP
    gate.over_cap("s")
    assert gate.admit("s") == (Outcome.OVER_CAP, False)  # not tried until the next check
    clock.now += 1.0
    assert gate.admit("s") == (None, True)
    gate.sent("s", 4)  # room again
    assert gate.admit("s")[0] is None
    assert sum("over its cap" in r.getMessage() for r in caplog.records) == 1

    gate.failed(ConnectionError("down"))
    assert gate.shut
    assert gate.failing
    clock.now += RETRY_AFTER_FAILURE_S
    assert not gate.shut
    assert gate.failing  # no answer yet
    gate.reachable()
    assert not gate.failing
    assert sum("reachable again" in r.getMessage() for r in caplog.records) == 1
