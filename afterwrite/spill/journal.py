"""The spill journal: entries Redis could not take, kept on local disk until it can.

Layout: one directory per Redis target (see :mod:`afterwrite.producer.wiring`), holding segment
files (:mod:`afterwrite.spill.files`) in the format of :mod:`afterwrite.spill.format`. Each process
appends to a segment of its own; a segment is replayed by whichever process holds its ``flock``
lock, then deleted.

Contracts:

- :meth:`SpillJournal.append` / :meth:`append_many` block for one ``write(2)`` (microseconds,
  no fsync) and never raise: False / a short count means the entry was *not* kept (journal
  full, disabled or the disk failing), and the caller counts it as dropped. A kept entry
  survives the process dying at any moment (it is in the kernel's page cache); it survives a
  power cut once :meth:`sync` ran (the producer's background thread calls it every second, and
  on close).
- Replay is :meth:`next_chunk` → send → :meth:`commit` with the number of leading entries Redis
  took. Progress is written into the segment after each chunk and the segment is deleted only
  after its last entry was sent, so entries are re-sent only when a commit was lost (a crash
  between send and commit, or a torn progress write): harmless, the event id is the primary key.
- Two processes never replay the same segment: a segment is replayed only under an exclusive
  ``flock``, which a writer holds on its active segment from before the file gets its final
  name, and which the kernel releases when a process dies. After taking the lock, a replayer
  checks that the name still points at the locked file (another replayer may have finished and
  deleted it meanwhile).
- Bounded: ``max_bytes`` caps all segments in the directory (every process sharing it; with
  ``shared_root``, every target directory under that root: the whole ``spill_dir``). It is
  measured by listing the directory when a segment is opened and at most every
  ``rescan_interval_s`` while full, and tracked in between from this process's own writes, so
  several processes writing at once overshoot by at most one segment each. When full, *new*
  entries are refused (dropped and counted by the caller); spilled ones are never dropped,
  because their callers were told SPILLED (a promise) while the caller of a refused entry
  learns DROPPED at once and can act on it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from afterwrite.spill import files
from afterwrite.spill import format as fmt
from afterwrite.spill.files import SUFFIX, Chunk, Item, Segment

__all__ = ["SUFFIX", "Chunk", "Item", "SpillJournal", "default_segment_bytes"]

log = logging.getLogger("afterwrite.producer.spill")


def default_segment_bytes(max_bytes: int) -> int:
    return max(64 * 1024, min(16 * 1024 * 1024, max_bytes // 16))


def room_for(sizes: Sequence[int], room: int) -> int:
    """How many leading records of these sizes fit in ``room`` bytes."""
    n = used = 0
    for size in sizes:
        if used + size > room:
            break
        used += size
        n += 1
    return n


class SpillJournal:
    """Thread-safe. One per client per process; see the module doc for the guarantees."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        segment_max_bytes: int | None = None,
        rescan_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        shared_root: Path | None = None,
    ) -> None:
        self.directory = Path(directory).absolute()
        self._shared_root = shared_root
        self.max_bytes = max_bytes
        self.segment_max_bytes = segment_max_bytes or default_segment_bytes(max_bytes)
        self._rescan_interval_s = rescan_interval_s
        self._clock = clock
        self._seq = itertools.count()
        self.skipped_bytes = 0
        """Bytes of torn or damaged records found while replaying (not replayable)."""
        self._init_state()

    def _init_state(self) -> None:
        self._lock = threading.Lock()  # writer side
        self._replay_lock = threading.Lock()  # reader side; taken before _lock, never after
        self._active: Segment | None = None
        self._active_size = 0
        self._dirty = False
        self._new_name = False
        self._used: int | None = None  # bytes in the directory, None until measured
        self._scanned_at = -1e18
        self._full = False
        self._appends = 0
        self._episode_spilled = 0  # since the journal was last found empty
        self._episode_replayed = 0
        self._full_segments: list[Segment] = []  # rotated, not yet fsynced and closed
        self._current: Segment | None = None
        self.maybe_pending = True  # unknown until looked: an earlier process may have left some

    # --- writing ------------------------------------------------------------------------------
    def append(self, kind: str, entry: bytes) -> bool:
        """Keep one entry; False if it was not kept. Never raises."""
        return self.append_many(((kind, entry),)) == 1

    def append_many(self, items: Sequence[Item]) -> int:
        """Keep ``items`` with one write; returns how many leading items were kept (the rest
        were not: journal full or disk failing). Never raises."""
        records = []
        for kind, entry in items:
            try:
                records.append(fmt.encode_record(kind, entry))
            except ValueError:
                log.exception("cannot spill an entry of kind %r", kind)
                break
        if not records:
            return 0
        with self._lock:
            try:
                return self._write(records)
            except OSError as exc:
                if self._active is not None:  # a torn record at its end is skipped on replay
                    files.release(self._active)
                    self._active = None
                if not self._full:
                    self._full = True
                    log.error(
                        "spill journal %s unwritable (%s); dropping entries",
                        self.directory,
                        exc,
                        extra={"action": "spill_error"},
                    )
                return 0

    def _write(self, records: list[bytes]) -> int:
        if self._active is not None and self._active_size >= self.segment_max_bytes:
            # No fsync here, on a request thread: the segment stays open (and locked, so not
            # yet replayable) until the next sync() fsyncs and closes it.
            self._full_segments.append(self._active)
            self._active = None
        if self._used is None or (self._full and self._due_for_rescan()):
            self._used = self._measure()
        header = fmt.HEADER_SIZE if self._active is None else 0
        n = room_for([len(r) for r in records], self.max_bytes - self._used - header)
        if n < len(records):
            self._note_full()
        if n == 0:
            return 0
        if self._active is None:
            self._active = files.create(self.directory, next(self._seq))
            self._active_size = header
            self._used += header
            self._new_name = True
        data = b"".join(records[:n]) if n > 1 else records[0]
        written = os.write(self._active.fd, data)
        if written != len(data):
            raise OSError(f"short write ({written} of {len(data)} bytes)")
        self._active_size += written
        self._used += written
        self._dirty = True
        self._appends += 1
        if self._full and n == len(records):
            self._full = False
            log.info("spill journal %s has room again", self.directory, extra={"action": "spill"})
        if self._episode_spilled == 0:
            log.warning(
                "spilling to %s until Redis takes entries again",
                self.directory,
                extra={"action": "spill"},
            )
        self._episode_spilled += n
        self.maybe_pending = True
        return n

    def _note_full(self) -> None:
        if not self._full:
            self._full = True
            log.error(
                "spill journal %s full (%d of %d bytes); dropping new entries until it drains",
                self.directory,
                self._used or 0,
                self.max_bytes,
                extra={"action": "spill_full"},
            )

    def _due_for_rescan(self) -> bool:
        return self._clock() - self._scanned_at >= self._rescan_interval_s

    def sync(self) -> None:
        """fsync what was spilled since the last call, then close (and so unlock) rotated
        segments. Blocks for the fsyncs: call it from a background thread."""
        with self._lock:
            done, self._full_segments = self._full_segments, []
            for seg in done:
                self._fsync(seg.fd)
                files.release(seg)
            if self._active is None or not self._dirty:
                return
            self._dirty = False
            new_name, self._new_name = self._new_name, False
            # Under the lock: a concurrent seal must not close the fd under us.
            self._fsync(self._active.fd)
            if new_name:
                try:
                    files.fsync_dir(self.directory)
                except OSError as exc:
                    log.warning("spill fsync failed: %s", exc)

    @staticmethod
    def _fsync(fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            log.warning("spill fsync failed: %s", exc)

    def seal(self) -> None:
        """Close the active segment (fsynced), making it replayable by anyone."""
        with self._lock:
            self._seal_locked()

    def _seal_locked(self) -> None:
        for seg in self._full_segments:
            self._fsync(seg.fd)
            files.release(seg)
        self._full_segments = []
        if self._active is not None:
            self._fsync(self._active.fd)
            files.release(self._active)
            self._active = None
            self._dirty = False

    def used_bytes(self) -> int:
        """Bytes the directory (or all of ``shared_root``) holds, as last measured plus this
        process's writes since."""
        with self._lock:
            if self._used is None:
                self._used = self._measure()
            return self._used

    def _measure(self) -> int:
        self._scanned_at = self._clock()
        used = files.usage(self.directory)  # also removes stale temporary files
        return used if self._shared_root is None else files.usage_under(self._shared_root)

    # --- replaying ----------------------------------------------------------------------------
    def next_chunk(self, max_entries: int) -> Chunk | None:
        """Up to ``max_entries`` spilled entries to replay, or None when there are none (then
        :attr:`maybe_pending` is False until something is spilled). Blocks for file reads."""
        with self._replay_lock:
            appends = self._appends
            while True:
                seg = self._current or self._acquire()
                if seg is None:
                    self._found_empty(appends)
                    return None
                self._current = seg
                chunk, skipped = files.read(seg, max_entries)
                self.skipped_bytes += skipped
                if chunk is not None:
                    return chunk
                self._finish(seg)

    def commit(self, chunk: Chunk, accepted: int) -> None:
        """The first ``accepted`` entries of ``chunk`` are in Redis: never send them again."""
        with self._replay_lock:
            seg = chunk.segment
            if accepted <= 0 or seg is not self._current:
                return
            seg.offset = chunk.ends[accepted - 1]
            self._episode_replayed += accepted
            if accepted == len(chunk.entries) and chunk.at_end:
                self._finish(seg)
                return
            try:
                os.pwrite(seg.fd, fmt.progress_bytes(seg.offset), fmt.PROGRESS_OFFSET)
            except OSError as exc:  # progress lost: these entries may be sent again (harmless)
                log.warning("cannot record replay progress in %s: %s", seg.path, exc)

    def replay_once(self, send: Callable[[list[Item]], int], max_entries: int) -> tuple[int, bool]:
        """Replay one chunk with ``send`` (returns how many leading entries Redis took).
        Returns (entries replayed, whether to go on at once)."""
        chunk = self.next_chunk(max_entries)
        if chunk is None:
            return 0, False
        accepted = send(chunk.entries)
        self.commit(chunk, accepted)
        return accepted, accepted == len(chunk.entries)

    def _acquire(self) -> Segment | None:
        active = self._active.path.name if self._active is not None else None
        for name in files.segment_names(self.directory):
            if name != active and (seg := files.lock(self.directory / name)):
                return seg
        if active is not None:
            # Nothing else left: our own segment is next. Sealing makes it replayable, and
            # later spills go to a new one.
            self.seal()
            return files.lock(self.directory / active)
        return None

    def _finish(self, seg: Segment) -> None:
        size = files.delete(seg)
        self._current = None
        with self._lock:
            if self._used is not None:
                self._used = max(0, self._used - size)

    def _found_empty(self, appends: int) -> None:
        with self._lock:
            if appends != self._appends:  # spilled while we looked: look again next time
                return
            self.maybe_pending = False
            if self._episode_replayed or self._episode_spilled:
                log.info(
                    "spill journal %s empty: %d entries replayed",
                    self.directory,
                    self._episode_replayed,
                    extra={"action": "replayed"},
                )
            self._episode_spilled = self._episode_replayed = 0

    # --- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Seal the active segment and let go of the one being replayed. Idempotent; the
        journal can be used again afterwards (it opens a new segment)."""
        with self._replay_lock:
            if self._current is not None:
                files.release(self._current)
                self._current = None
        self.seal()

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's segments without touching their locks (see
        :func:`afterwrite.spill.files.release`); the child starts its own segment when it spills."""
        for seg in (self._active, self._current, *self._full_segments):
            if seg is not None:
                files.release(seg)
        self._init_state()
