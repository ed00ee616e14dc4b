"""The spill journal on a real file system: crash safety, restart, bounds, concurrent replay."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from afterwrite.spill import format as fmt
from afterwrite.spill.files import SUFFIX
from afterwrite.spill.journal import SpillJournal

Item = tuple[str, bytes]


def entry(i: int, size: int = 100) -> bytes:
    return f"entry-{i:06d}-".encode().ljust(size, b".")


def segments(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob(f"*{SUFFIX}"))


def replay_all(journal: SpillJournal, *, max_entries: int = 50) -> list[Item]:
    got: list[Item] = []

    def send(items: list[Item]) -> int:
        got.extend(items)
        return len(items)

    while journal.replay_once(send, max_entries)[0]:
        pass
    return got


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entries_round_trip_in_order_and_the_segment_is_deleted(tmp_path: Path) -> None:
    j = SpillJournal(tmp_path, max_bytes=10_000_000)
    items = [("query", entry(i)) for i in range(500)] + [("metric", b"\x00\xff" * 10)]
    for kind, e in items:
        assert j.append(kind, e)
    assert j.append_many([("query", entry(1000)), ("query", entry(1001))]) == 2
    j.close()
    assert len(segments(tmp_path)) == 1
    replayer = SpillJournal(tmp_path, max_bytes=10_000_000)
    got = replay_all(replayer)
    assert got == [*items, ("query", entry(1000)), ("query", entry(1001))]
    assert segments(tmp_path) == []
    assert replayer.next_chunk(10) is None
    assert not replayer.maybe_pending


def test_torn_tail_record_is_skipped_not_fatal(tmp_path: Path) -> None:
    j = SpillJournal(tmp_path, max_bytes=10_000_000)
    for i in range(20):
        j.append("query", entry(i))
    j.close()
    (seg,) = segments(tmp_path)
    size = seg.stat().st_size
    os.truncate(seg, size - 7)  # the last record's write was cut short by a crash
    r = SpillJournal(tmp_path, max_bytes=10_000_000)
    got = replay_all(r)
    assert [e for _, e in got] == [entry(i) for i in range(19)]
    assert r.skipped_bytes == len(fmt.encode_record("query", entry(19))) - 7
    assert segments(tmp_path) == []


def test_zero_filled_tail_and_a_damaged_middle_record_are_skipped(tmp_path: Path) -> None:
    j = SpillJournal(tmp_path, max_bytes=10_000_000)
    for i in range(30):
        j.append("query", entry(i))
    j.close()
    (seg,) = segments(tmp_path)
    record = len(fmt.encode_record("query", entry(0)))
    with seg.open("r+b") as f:
        f.seek(fmt.HEADER_SIZE + 10 * record + fmt.RECORD_HEADER_SIZE + 20)
        f.write(b"X")  # bit rot inside record 10's body: its checksum fails
        f.seek(0, os.SEEK_END)
        f.write(b"\x00" * 4096)  # what a file system may leave after a power cut
    r = SpillJournal(tmp_path, max_bytes=10_000_000)
    got = replay_all(r, max_entries=7)
    assert [e for _, e in got] == [entry(i) for i in range(30) if i != 10]
    assert r.skipped_bytes == record + 4096


def test_partial_acceptance_advances_exactly_and_survives_a_restart(tmp_path: Path) -> None:
    j = SpillJournal(tmp_path, max_bytes=10_000_000)
    for i in range(100):
        j.append("query", entry(i))
    j.close()
    first = SpillJournal(tmp_path, max_bytes=10_000_000)
    sent: list[bytes] = []

    def take_some(items: list[Item]) -> int:
        sent.extend(e for _, e in items[:13])  # e.g. the stream filled up after 13
        return 13

    assert first.replay_once(take_some, 40) == (13, False)
    assert first.replay_once(take_some, 40) == (13, False)
    first.close()  # the process ends; progress is in the segment header
    second = SpillJournal(tmp_path, max_bytes=10_000_000)
    rest = replay_all(second)
    assert sent + [e for _, e in rest] == [entry(i) for i in range(100)]  # nothing twice


def test_torn_progress_write_replays_from_the_start(tmp_path: Path) -> None:
    j = SpillJournal(tmp_path, max_bytes=10_000_000)
    for i in range(10):
        j.append("query", entry(i))
    j.close()
    r = SpillJournal(tmp_path, max_bytes=10_000_000)
    assert r.replay_once(lambda items: 4, 10) == (4, False)
    r.close()
    (seg,) = segments(tmp_path)
    with seg.open("r+b") as f:
        f.seek(fmt.PROGRESS_OFFSET + 8)
        f.write(b"\xde\xad")  # the progress checksum no longer matches
    again = replay_all(SpillJournal(tmp_path, max_bytes=10_000_000))
    assert len(again) == 10  # re-sent rather than skipped: duplicates are harmless


def test_restart_replays_what_a_killed_process_left(tmp_path: Path) -> None:
    code = f"""
import os, sys
sys.path.insert(0, {str(Path.cwd())!r})
from afterwrite.spill.journal import SpillJournal
j = SpillJournal({str(tmp_path)!r}, max_bytes=10_000_000, segment_max_bytes=64 * 1024)
for i in range(3000):
    assert j.append("query", f"entry-{{i:06d}}-".encode().ljust(100, b"."))
os._exit(0)  # no close, no fsync, no atexit: as if killed
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    left = segments(tmp_path)
    assert len(left) > 1  # rotated segments plus the one it was writing when it died
    got = replay_all(SpillJournal(tmp_path, max_bytes=10_000_000))
    assert [e for _, e in got] == [entry(i) for i in range(3000)]
    assert segments(tmp_path) == []


def test_a_live_writers_segment_is_not_replayed_by_another_journal(tmp_path: Path) -> None:
    writer = SpillJournal(tmp_path, max_bytes=10_000_000)
    other = SpillJournal(tmp_path, max_bytes=10_000_000)
    writer.append("query", entry(1))
    assert other.next_chunk(10) is None  # locked by its writer, which may still append
    writer.append("query", entry(2))
    writer.close()
    assert [e for _, e in replay_all(other)] == [entry(1), entry(2)]


def test_own_segment_is_sealed_and_replayed_while_spilling_goes_on(tmp_path: Path) -> None:
    j = SpillJournal(tmp_path, max_bytes=10_000_000)
    j.append("query", entry(1))
    chunk = j.next_chunk(10)
    assert chunk is not None
    j.append("query", entry(2))  # lands in a new segment
    j.commit(chunk, len(chunk.entries))
    assert [e for _, e in replay_all(j)] == [entry(2)]
    assert segments(tmp_path) == []


def test_full_journal_refuses_new_entries_keeps_old_ones_and_recovers(tmp_path: Path) -> None:
    clock = Clock()
    j = SpillJournal(
        tmp_path,
        max_bytes=64 * 1024,
        segment_max_bytes=16 * 1024,
        rescan_interval_s=1.0,
        clock=clock,
    )
    results = [j.append("query", entry(i, 1000)) for i in range(100)]
    kept = results.count(True)
    assert results == [True] * kept + [False] * (100 - kept)  # new ones refused, none evicted
    assert kept > 50
    assert sum(p.stat().st_size for p in segments(tmp_path)) <= 64 * 1024
    assert j.append_many([("query", entry(500, 20)), ("query", entry(501, 1000))]) == 1  # fits
    j.sync()  # what the producer thread does every second: rotated segments become replayable
    # Another process replays (and deletes) them meanwhile.
    replayer = SpillJournal(tmp_path, max_bytes=64 * 1024)
    got = [e for _, e in replay_all(replayer)]
    assert got
    assert got == [entry(i, 1000) for i in range(len(got))]
    assert not j.append("query", entry(600, 1000))  # not measured again yet
    clock.now += 1.0
    assert j.append("query", entry(601, 1000))  # measured again: room
    j.close()
    rest = [e for _, e in replay_all(replayer)]
    assert got + rest == [
        *(entry(i, 1000) for i in range(kept)),
        entry(500, 20),
        entry(601, 1000),
    ]


def test_two_journals_replaying_one_directory_never_send_an_entry_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_flock = fcntl.flock

    def slow_flock(fd: int, operation: int) -> None:
        # Widen the race between opening a segment and locking it: meanwhile the other
        # replayer may finish that segment and delete it.
        time.sleep(0.002)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", slow_flock)
    expected: list[bytes] = []
    for w in range(6):  # six dead writers' segments
        writer = SpillJournal(tmp_path, max_bytes=100_000_000, segment_max_bytes=64 * 1024)
        for i in range(800):
            e = entry(w * 10_000 + i)
            writer.append("query", e)
            expected.append(e)
        writer.close()
    assert len(segments(tmp_path)) > 6
    sent: list[list[bytes]] = [[], []]
    barrier = threading.Barrier(2)

    def replayer(n: int) -> None:
        j = SpillJournal(tmp_path, max_bytes=100_000_000)  # its own open files: own locks

        def send(items: list[Item]) -> int:
            time.sleep(0.001)  # a round trip, so that the two interleave
            sent[n].extend(e for _, e in items)
            return len(items)

        barrier.wait()
        while j.replay_once(send, 50)[0] or j.next_chunk(1) is not None:
            pass
        j.close()

    threads = [threading.Thread(target=replayer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sent[0]
    assert sent[1]
    assert sorted(sent[0] + sent[1]) == sorted(expected)  # each entry exactly once
    assert segments(tmp_path) == []


def test_unwritable_directory_refuses_without_raising(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    j = SpillJournal(blocker / "spill", max_bytes=10_000_000)
    assert not j.append("query", entry(1))
    assert j.next_chunk(10) is None


def test_a_foreign_file_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / f"seg-0-0-0{SUFFIX}").write_bytes(b"not a segment at all, but long enough to read")
    j = SpillJournal(tmp_path, max_bytes=10_000_000)
    assert j.next_chunk(10) is None
    assert (tmp_path / "seg-0-0-0.corrupt").exists()
    assert "not a spill segment" in caplog.text


def test_record_format_rejects_what_it_cannot_replay() -> None:
    with pytest.raises(ValueError, match="kind"):
        fmt.encode_record("Query; DROP", b"x")
    rec = fmt.encode_record("query", b"payload")
    assert fmt.parse(rec, 10).entries == [("query", b"payload")]
    assert fmt.parse(rec[:-1], 10).status == "partial"
    damaged = rec[:-1] + b"?"
    assert fmt.parse(damaged, 10).status == "corrupt"
    assert fmt.resync(damaged + rec, 0) == len(rec)
    assert fmt.resync(damaged, 0) is None


def test_the_bound_covers_every_target_under_the_spill_dir(tmp_path: Path) -> None:
    a = SpillJournal(tmp_path / "redis-a", max_bytes=64 * 1024, shared_root=tmp_path)
    while a.append("query", entry(0, 1000)):
        pass
    a.close()
    b = SpillJournal(tmp_path / "redis-b", max_bytes=64 * 1024, shared_root=tmp_path)
    assert not b.append("query", entry(1, 1000))  # the directory is full, whoever filled it
    assert b.used_bytes() > 60 * 1024
