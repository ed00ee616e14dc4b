"""UUIDv7 event ids (RFC 9562): time-ordered, so primary-key inserts stay append-mostly."""

from __future__ import annotations

import random
import time
import uuid

_VERSION_7 = 0x7 << 76
_VARIANT = 0x2 << 62


def uuid7(unix_ms: int | None = None) -> uuid.UUID:
    """A new UUIDv7: 48-bit Unix milliseconds, then 74 random bits."""
    return uuid.UUID(int=_uuid7_int(unix_ms))


def uuid7_str() -> str:
    """``str(uuid7())``, without building a UUID object (this runs on the hot path)."""
    h = f"{_uuid7_int(None):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _uuid7_int(unix_ms: int | None) -> int:
    ms = time.time_ns() // 1_000_000 if unix_ms is None else unix_ms
    # random is seeded from os.urandom and re-seeded in forked children by CPython itself;
    # a syscall per id (os.urandom) tripled the cost of an id on the hot path.
    rand = random.getrandbits(74)
    rand_a = rand >> 62
    rand_b = rand & ((1 << 62) - 1)
    return (ms & 0xFFFF_FFFF_FFFF) << 80 | _VERSION_7 | rand_a << 64 | _VARIANT | rand_b


def uuid7_unix_ms(value: uuid.UUID) -> int:
    """The millisecond timestamp a UUIDv7 carries."""
    return value.int >> 80
