"""The stream wire format, shared by producers and workers.

One record is one Redis Stream entry with a single field ``p`` holding the record as a msgpack
map (column name → value). msgpack keeps entries compact (a typical query record is ~40% smaller
than JSON), encodes datetimes natively, and decodes in C; the kind is implied by the stream.
The entry id Redis assigns carries the enqueue time in milliseconds, so lag needs no extra field.
"""

from __future__ import annotations

from typing import Any

import msgspec

from afterwrite.core.errors import PoisonError

PAYLOAD_FIELD = b"p"


def _enc_hook(obj: Any) -> Any:
    # Subclasses of builtins (a Receipt passed back as an event id, a str-valued enum from the
    # application) are sent as their plain value.
    for base in (str, int, float):
        if isinstance(obj, base):
            return base(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_decoder = msgspec.msgpack.Decoder()


class EncodeError(PoisonError, ValueError):
    """The record cannot be encoded (an unsupported type, a lone surrogate in a string, …)."""

    def __init__(self, detail: str) -> None:
        super().__init__("unencodable", detail)


def encode(record: Any) -> bytes:
    """A record (a dict of column → value, or a msgspec Struct) as an entry's payload."""
    try:
        return _encoder.encode(record)
    except (TypeError, ValueError, UnicodeEncodeError, OverflowError) as exc:
        raise EncodeError(str(exc)) from exc


def decode(payload: bytes) -> Any:
    """Decode one entry's payload; raises msgspec.DecodeError for malformed bytes."""
    return _decoder.decode(payload)


def stream_key(prefix: str, kind: str) -> str:
    return f"{prefix}:stream:{kind}"


def entry_ms(entry_id: bytes | str) -> int:
    """Milliseconds since the epoch at which Redis accepted the entry."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])
