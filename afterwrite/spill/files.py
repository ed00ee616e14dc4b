"""Segment files of the spill journal: creating, locking, reading, measuring. No policy here.

Names are ``seg-<time_ns>-<pid>-<seq>.awspill`` (sorted ≈ oldest first). A new segment is created
under a ``.tmp-`` name, locked, given its header and only then renamed, so a replayer never sees
a segment that is not yet locked by its writer. Every fd is opened close-on-exec: a subprocess
must not inherit (and keep alive) a segment's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from afterwrite.spill import format as fmt

log = logging.getLogger("afterwrite.producer.spill")

SUFFIX = ".awspill"
PREFIX = "seg-"
TMP_PREFIX = ".tmp-"
STALE_TMP_S = 60.0
READ_WINDOW_BYTES = 1024 * 1024

Item = tuple[str, bytes]
"""(kind, stream entry bytes)."""


@dataclass
class Segment:
    path: Path
    fd: int
    offset: int
    """Writer: unused. Replayer: the first byte not yet replayed."""


@dataclass
class Chunk:
    """Entries read for replay; hand back to
    :meth:`afterwrite.spill.journal.SpillJournal.commit`."""

    entries: list[Item]
    ends: list[int] = field(repr=False)
    """File offset just past each entry's record."""
    segment: Segment = field(repr=False)
    at_end: bool = False
    """Nothing follows these entries in the segment."""


def segment_names(directory: Path) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError:  # not there yet (nothing spilled), or unreadable: nothing to replay
        return []
    return sorted(n for n in names if n.startswith(PREFIX) and n.endswith(SUFFIX))


def create(directory: Path, seq: int) -> Segment:
    """A new segment, locked by the caller from before it has its final name."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = f"{PREFIX}{time.time_ns():020d}-{os.getpid()}-{seq:06d}{SUFFIX}"
    tmp = directory / (TMP_PREFIX + name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, fmt.header())
        os.rename(tmp, directory / name)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return Segment(directory / name, fd, fmt.HEADER_SIZE)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock(path: Path) -> Segment | None:
    """Open and lock a segment for replay; None if someone else holds it (its writer, or
    another replayer), if it is gone, or if it is not a segment (then renamed ``*.corrupt``)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Another replayer may have finished this segment and deleted it between our open and
        # our lock: then the name no longer leads to the file we locked.
        same = os.path.samestat(os.fstat(fd), os.stat(path))
    except (BlockingIOError, FileNotFoundError):
        same = False
    if not same:
        os.close(fd)
        return None
    try:
        offset = fmt.read_header(os.pread(fd, fmt.HEADER_SIZE, 0))
    except fmt.HeaderError as exc:
        log.error("%s is not a spill segment (%s); renamed to *.corrupt", path, exc)
        with contextlib.suppress(OSError):
            path.rename(path.with_suffix(".corrupt"))
        os.close(fd)
        return None
    return Segment(path, fd, offset)


def read(seg: Segment, max_entries: int) -> tuple[Chunk | None, int]:
    """The next entries of a locked segment from ``seg.offset``, and how many damaged bytes were
    skipped to find them (``seg.offset`` moves past those). ``(None, skipped)`` at the end."""
    size = os.fstat(seg.fd).st_size
    window = READ_WINDOW_BYTES
    skipped = 0
    while seg.offset < size:
        data = os.pread(seg.fd, min(window, size - seg.offset), seg.offset)
        parsed = fmt.parse(data, max_entries)
        tail = seg.offset + parsed.stop
        if parsed.entries:
            ends = [seg.offset + e for e in parsed.ends]
            return Chunk(parsed.entries, ends, seg, at_end=tail >= size), skipped
        if parsed.status == "partial" and tail + parsed.need <= size:
            window = parsed.need  # one record larger than the window
            continue
        if parsed.status == "corrupt":
            rest = os.pread(seg.fd, size - tail, tail)
            found = fmt.resync(rest, 0)
            skip = len(rest) if found is None else found
        else:  # a record torn by a crash at the end of the segment: never completed
            skip = size - tail
        log.warning(
            "skipped %d damaged bytes at offset %d of %s",
            skip,
            tail,
            seg.path,
            extra={"action": "spill_damaged"},
        )
        skipped += skip
        seg.offset = tail + skip
    return None, skipped


def usage_under(root: Path) -> int:
    """Bytes of all segments in the directories right under ``root`` (every Redis target)."""
    try:
        subdirs = [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return 0
    return sum(usage(d) for d in subdirs)


def usage(directory: Path) -> int:
    """Bytes of all segments in ``directory``; removes temporary files a crashed writer left."""
    used = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    now = time.time()
    for name in names:
        path = directory / name
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if name.startswith(TMP_PREFIX) and now - st.st_mtime > STALE_TMP_S:
            _remove_unlocked(path)
        elif name.startswith((PREFIX, TMP_PREFIX)):
            used += st.st_size
    return used


def _remove_unlocked(path: Path) -> None:
    # A writer died between creating a segment and naming it: only a header inside.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)


def delete(seg: Segment) -> int:
    """Remove a locked segment (every entry replayed), then unlock it; returns its size."""
    size = os.fstat(seg.fd).st_size
    with contextlib.suppress(FileNotFoundError):
        seg.path.unlink()
    os.close(seg.fd)
    return size


def release(seg: Segment) -> None:
    """Close (and so unlock) a segment. In a forked child this closes only the child's copy:
    the lock belongs to the open file, shared with the parent, and stays the parent's."""
    with contextlib.suppress(OSError):
        os.close(seg.fd)
