"""The spill journal's on-disk format: pure functions over bytes, no I/O, no pickle.

A segment file is a header followed by records, appended by one writer::

    header  b"AWSPILL1" | replayed-up-to offset (u64 LE) | its crc32 (u32 LE) | 12 zero bytes
    record  b"\\xa7\\x5e" | body length (u32 LE) | crc32 of length + body (u32 LE) | body
    body    kind length (u8) | kind (ASCII, the registry's name rule) | stream entry (wire bytes)

Why this shape:

- A checksum per record: a write torn by a crash or a power cut is detected and skipped, never
  replayed as garbage and never fatal. The length is inside the checksum, so a zero-filled tail
  (what some file systems leave after a crash) cannot pass as records.
- A two-byte marker per record: after a damaged record in the middle of a file (a bad disk,
  not a crash), the reader resynchronises on the next record that checks out and keeps going.
- The replay position lives in the header and is rewritten in place (12 bytes, one sector) as
  chunks are replayed, with its own checksum; if that write is torn the reader starts from the
  first record again, which re-sends entries (harmless: the event id is the primary key).
- The body is the exact stream entry the producer would have sent (msgpack, see
  :mod:`afterwrite.core.wire`), so replay is a byte copy and nothing executable is ever stored.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Literal

from afterwrite.core.errors import PoisonError

MAGIC = b"AWSPILL1"
HEADER = struct.Struct("<8sQI12x")
HEADER_SIZE = HEADER.size  # 32
PROGRESS_OFFSET = 8
PROGRESS = struct.Struct("<QI")

MARKER = b"\xa7\x5e"
RECORD = struct.Struct("<2sII")
RECORD_HEADER_SIZE = RECORD.size  # 10
MAX_BODY = 64 * 1024 * 1024
_KIND = re.compile(rb"[a-z][a-z0-9_]{0,47}")


class HeaderError(PoisonError, ValueError):
    """Not a spill segment (wrong magic or too short)."""

    def __init__(self, detail: str) -> None:
        super().__init__("not_a_segment", detail)


def header(progress: int = HEADER_SIZE) -> bytes:
    return HEADER.pack(MAGIC, progress, zlib.crc32(progress.to_bytes(8, "little")))


def progress_bytes(offset: int) -> bytes:
    """The 12 bytes written at :data:`PROGRESS_OFFSET` to record replay progress."""
    return PROGRESS.pack(offset, zlib.crc32(offset.to_bytes(8, "little")))


def read_header(raw: bytes) -> int:
    """The replay position from a segment's first bytes. A damaged position (torn rewrite)
    reads as the first record: replaying twice is safe, skipping is not. HeaderError when the
    bytes are not a segment header at all."""
    if len(raw) < HEADER_SIZE:
        raise HeaderError("shorter than a segment header")
    magic, progress, crc = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise HeaderError(f"bad magic {magic!r}")
    if crc != zlib.crc32(progress.to_bytes(8, "little")) or progress < HEADER_SIZE:
        return HEADER_SIZE
    return int(progress)


def encode_record(kind: str, entry: bytes) -> bytes:
    """One record. ``kind`` must be a registry name (ValueError otherwise)."""
    k = kind.encode("ascii")
    if not _KIND.fullmatch(k):
        raise ValueError(f"not a kind name: {kind!r}")
    body = bytes((len(k),)) + k + entry
    if len(body) > MAX_BODY:
        raise ValueError(f"entry of {len(entry)} bytes is larger than a spill record may be")
    length = len(body).to_bytes(4, "little")
    crc = zlib.crc32(body, zlib.crc32(length))
    return MARKER + length + crc.to_bytes(4, "little") + body


Status = Literal["end", "limit", "partial", "corrupt"]


@dataclass
class Parsed:
    """What :func:`parse` found in a buffer."""

    entries: list[tuple[str, bytes]] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    """Offset (into the buffer) just past each entry's record."""
    stop: int = 0
    """Where parsing stopped: the start of the first record not returned."""
    status: Status = "end"
    """``end``: the buffer ends on a record boundary. ``limit``: ``max_entries`` reached.
    ``partial``: the record at ``stop`` continues past the buffer (``need`` bytes in all).
    ``corrupt``: the bytes at ``stop`` are not a valid record."""
    need: int = 0


def _check(buf: bytes | memoryview, pos: int) -> tuple[Status, int, tuple[str, bytes] | None]:
    """The record at ``pos``: ("end", its end offset, entry) when whole and valid; else the
    status and, when partial, the bytes the record needs from ``pos``."""
    if len(buf) - pos < RECORD_HEADER_SIZE:
        return "partial", RECORD_HEADER_SIZE, None
    marker, length, crc = RECORD.unpack_from(buf, pos)
    if marker != MARKER or not 2 <= length <= MAX_BODY:
        return "corrupt", 0, None
    end = pos + RECORD_HEADER_SIZE + length
    if end > len(buf):
        return "partial", RECORD_HEADER_SIZE + length, None
    body = bytes(buf[pos + RECORD_HEADER_SIZE : end])
    if zlib.crc32(body, zlib.crc32(length.to_bytes(4, "little"))) != crc:
        return "corrupt", 0, None
    k = body[0]
    kind = body[1 : 1 + k]
    if k + 1 > len(body) or not _KIND.fullmatch(kind):
        return "corrupt", 0, None
    return "end", end, (kind.decode("ascii"), body[1 + k :])


def parse(buf: bytes | memoryview, max_entries: int) -> Parsed:
    """Records from the start of ``buf`` (which starts on a record boundary), at most
    ``max_entries`` of them."""
    out = Parsed()
    pos = 0
    while pos < len(buf):
        if len(out.entries) >= max_entries:
            out.status = "limit"
            break
        status, end_or_need, entry = _check(buf, pos)
        if entry is None:
            out.status, out.need = status, end_or_need
            break
        out.entries.append(entry)
        out.ends.append(end_or_need)
        pos = end_or_need
    out.stop = pos
    return out


def resync(buf: bytes | memoryview, start: int) -> int | None:
    """After a damaged record at ``start``: the offset of the next whole, valid record in
    ``buf``, or None when none follows (the rest is skipped)."""
    data = bytes(buf)
    pos = start + 1
    while True:
        pos = data.find(MARKER, pos)
        if pos < 0:
            return None
        if _check(data, pos)[2] is not None:
            return pos
        pos += 1
