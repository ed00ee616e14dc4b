"""The stream wire format, shared by producers and workers.

One record is one Redis Stream entry with a single field ``p`` holding the record as a msgpack
map (column name → value). msgpack keeps entries compact (a typical query record is ~40% smaller
than JSON), encodes datetimes natively, and decodes in C; the kind is implied by the stream.
The entry id Redis assigns carries the enqueue time in milliseconds, so lag needs no extra field.
"""

from __future__ import annotations

import reprlib
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
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        # RecursionError: nested ~1,000 deep (or a cycle); never into the caller's handler
        raise EncodeError(f"{type(exc).__name__}: {exc}") from exc


# A record that cannot be encoded still travels, as this msgpack extension type holding the
# reason and a printable rendering of what was given, so the worker can dead-letter it: a
# caller who does not read receipts still finds it in ``afterwrite dlq list``. No normal
# payload is an extension type at its top level.
UNENCODABLE_EXT = 1
MAX_UNENCODABLE_CHARS = 64 * 1024
_render = reprlib.Repr()  # keyword arguments need Python 3.12
_render.maxlevel = 32
_render.maxdict = _render.maxlist = _render.maxtuple = 256
_render.maxstring = 16_384
_render.maxother = 4096


def unencodable(record: Any, reason: str) -> bytes:
    """The payload standing in for ``record``, which :func:`encode` refused for ``reason``."""
    if isinstance(record, msgspec.Struct):
        record = msgspec.structs.asdict(record)
    try:
        text = _render.repr(record)
    except Exception as exc:
        text = f"<not representable: {type(exc).__name__}>"
    # lone surrogates (the usual reason) are escaped by repr; anything else left is replaced
    text = text[:MAX_UNENCODABLE_CHARS].encode("utf-8", "backslashreplace").decode()
    body = _encoder.encode({"reason": reason[:1000], "record": text})
    return _encoder.encode(msgspec.msgpack.Ext(UNENCODABLE_EXT, body))


def unencodable_content(payload: Any) -> dict[str, str] | None:
    """``{"reason", "record"}`` when a decoded payload is an :func:`unencodable` stand-in."""
    if isinstance(payload, msgspec.msgpack.Ext) and payload.code == UNENCODABLE_EXT:
        try:
            content = _decoder.decode(payload.data)
        except msgspec.DecodeError:
            return {"reason": "unencodable", "record": ""}
        if isinstance(content, dict):
            return {"reason": str(content.get("reason")), "record": str(content.get("record"))}
        return {"reason": "unencodable", "record": ""}
    return None


def decode(payload: bytes) -> Any:
    """Decode one entry's payload; raises msgspec.DecodeError for malformed bytes."""
    return _decoder.decode(payload)


def stream_key(prefix: str, kind: str) -> str:
    return f"{prefix}:stream:{kind}"


def entry_ms(entry_id: bytes | str) -> int:
    """Milliseconds since the epoch at which Redis accepted the entry."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])
