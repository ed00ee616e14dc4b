"""Removing entries from the spill journals on this host (``afterwrite erase``).

Every segment under the spill root (one directory per Redis target) that no process holds is
locked as a replayer would lock it, read whole, and, when some of its entries match, replaced
by a new segment with the others (written, fsynced and named before the old one is deleted).
A segment a live producer is writing to is locked by it and left alone (counted as busy): the
tombstone the erasure leaves makes the drains drop those entries when they are replayed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from afterwrite.spill import files
from afterwrite.spill import format as fmt


@dataclass
class SpillErasure:
    removed: int = 0
    """Entries removed."""
    busy_segments: int = 0
    """Segments held by a live writer (or a replayer), left for the tombstone."""


def erase_entries(
    root: Path, matches: Callable[[str, bytes], bool], *, dry_run: bool = False
) -> SpillErasure:
    """Remove the entries ``matches(kind, entry)`` says to from every segment under ``root``
    (or, ``dry_run``, count them). Idempotent."""
    out = SpillErasure()
    try:
        directories = [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return out
    for directory in directories:
        for name in files.segment_names(directory):
            seg = files.lock(directory / name)
            if seg is None:
                out.busy_segments += 1
                continue
            try:
                out.removed += _rewrite(directory, seg, matches, dry_run=dry_run)
            finally:
                files.release(seg)
    return out


def _rewrite(
    directory: Path, seg: files.Segment, matches: Callable[[str, bytes], bool], *, dry_run: bool
) -> int:
    kept: list[tuple[str, bytes]] = []
    removed = 0
    while True:
        chunk, _ = files.read(seg, 10_000)
        if chunk is None:
            break
        for kind, entry in chunk.entries:
            if matches(kind, entry):
                removed += 1
            else:
                kept.append((kind, entry))
        seg.offset = chunk.ends[-1]
    if not removed or dry_run:
        return removed
    if kept:
        fresh = files.create(directory, 0)
        try:
            os.write(fresh.fd, b"".join(fmt.encode_record(k, e) for k, e in kept))
            os.fsync(fresh.fd)
        finally:
            files.release(fresh)
        files.fsync_dir(directory)
    os.unlink(seg.path)  # still locked by us: no replayer reads it meanwhile
    files.fsync_dir(directory)
    return removed
