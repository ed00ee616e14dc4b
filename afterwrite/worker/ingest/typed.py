"""The fast path from a stream payload to a row: one typed msgspec decode, checked in C.

:class:`TypedCodec` is derived from a kind's table, like :class:`~.rows.RowCodec`, and accepts
a subset of what RowCodec accepts: the canonical forms afterwrite clients send (a lower-case
UUID string, a timezone-aware timestamp, numbers and strings of the column's type within its
limits, JSON of finite numbers and string keys). Types, lengths, ranges, finiteness and
unknown or missing fields are checked by msgspec while it decodes (``Meta`` constraints);
what it cannot express (NUL characters, a timestamp in the future, JSON size) is checked here
on the few values that need it.

It never decides that an entry is bad. Anything it does not accept makes :meth:`row` return
None, and the caller takes RowCodec's path on the same bytes, which names the problem with its
dead-letter code or, for a form only RowCodec accepts (an epoch timestamp, an upper-case UUID,
``3.0`` for an integer), builds the row. So every validation rule stays RowCodec's, and a row
from here is exactly the one RowCodec would build (tests/unit/test_typed_rows.py checks both).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta
from sqlalchemy import Column, Table, types

from afterwrite.models.base import writable_columns
from afterwrite.worker.ingest import rows

_FLOAT_MAX = sys.float_info.max
_Finite = Annotated[float, Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]  # NaN fails both bounds
JSON_FAST_DEPTH = 8
"""JSON nested deeper than this takes RowCodec's path (which allows up to MAX_JSON_DEPTH)."""


def _json_type(depth: int) -> Any:
    """JSON values nested at most ``depth`` deep: finite numbers, string keys, no bytes. Not
    None at the top (a nullable column adds it)."""
    scalars = (bool, int, _Finite, str)
    inner: Any = Union[(None, *scalars)]
    for _ in range(depth - 1):
        inner = Union[(None, *scalars, list[inner], dict[str, inner])]
    return Union[(*scalars, list[inner], dict[str, inner])]


_SLOW: Any = object()
"""What a check returns when the value needs RowCodec's judgement."""


Check = Callable[[Any], Any]


class TypedCodec:
    """Rows for one table from payload bytes, or None (take RowCodec's path). Immutable."""

    def __init__(self, table: Table, *, max_future_skew_s: float = 86_400.0) -> None:
        fields: list[tuple[str, Any, Any]] = []
        checks: list[tuple[int, Check]] = []
        columns = writable_columns(table)  # as RowCodec: never the ones PostgreSQL generates
        for i, column in enumerate(columns):
            typ, check = _column(column, max_future_skew_s)
            required = not column.nullable and column.server_default is None
            if required:
                fields.append((f"f{i}", typ, msgspec.NODEFAULT))
            else:
                fields.append((f"f{i}", Union[typ, None], None))  # noqa: UP007
            if check is not None:
                checks.append((i, check))
        struct = msgspec.defstruct(
            f"_{table.name}_payload",
            fields,
            rename={f"f{i}": str(c.name) for i, c in enumerate(columns)},
            forbid_unknown_fields=True,
            kw_only=True,
        )
        self._decode = msgspec.msgpack.Decoder(struct).decode
        self._checks = tuple(checks)
        self.columns: tuple[str, ...] = tuple(c.name for c in columns)

    def row(self, payload: bytes) -> tuple[Any, ...] | None:
        """The row for ``payload`` (column order), or None when RowCodec must judge it."""
        try:
            values = list(msgspec.structs.astuple(self._decode(payload)))
        except (msgspec.DecodeError, RecursionError):
            return None
        for i, check in self._checks:
            v = values[i]
            if v is not None:
                v = check(v)
                if v is _SLOW:
                    return None
                values[i] = v
        return tuple(values)


def _column(column: Column[Any], max_future_skew_s: float) -> tuple[Any, Check | None]:
    """msgspec type and extra check for a column (mirrors ``rows._converter``/``_with_rules``)."""
    t = column.type
    info = column.info
    if info.get("server_owned"):
        return None, None  # only absent (or nil) is fast; a value gets RowCodec's refusal
    least = info.get("min")
    if isinstance(t, types.Uuid):
        canonical = Meta(pattern=rows.CANONICAL_UUID.pattern, min_length=36, max_length=36)
        return Annotated[str, canonical], None
    if isinstance(t, types.DateTime):
        future = _not_future(max_future_skew_s) if info.get("not_future") else None
        return Annotated[datetime, Meta(tz=True)], future
    if isinstance(t, types.Boolean):
        return bool, None
    if isinstance(t, types.Integer):
        lo, hi = rows.int_range(t)
        if least is not None:
            lo = max(lo, least)
        return Annotated[int, Meta(ge=lo, le=hi)], None
    if isinstance(t, types.Float | types.Numeric):
        lo_f = -_FLOAT_MAX if least is None else max(-_FLOAT_MAX, float(least))
        return Annotated[float, Meta(ge=lo_f, le=_FLOAT_MAX)], None
    if isinstance(t, types.JSON):
        max_bytes = int(info.get("max_bytes", rows.MAX_JSON_BYTES))
        typ = list[str] if info.get("items") == "str" else _json_type(JSON_FAST_DEPTH)
        return typ, _json(max_bytes)
    if isinstance(t, types.String):
        limit = int(info.get("max_chars", t.length or rows.MAX_TEXT_CHARS))
        return Annotated[str, Meta(max_length=limit)], _no_nul
    if isinstance(t, types.LargeBinary):
        return (bytes if t.length is None else Annotated[bytes, Meta(max_length=t.length)]), None
    raise TypeError(
        f"column {column.table.name}.{column.name}: type {t!r} is not supported by afterwrite"
    )


def _no_nul(v: str) -> str:
    return _SLOW if "\x00" in v else v


def _not_future(max_future_skew_s: float) -> Check:
    def check(v: datetime) -> datetime:
        return _SLOW if v.timestamp() > time.time() + max_future_skew_s else v

    return check


_json_encode = msgspec.json.Encoder().encode


def _json(max_bytes: int) -> Check:
    def check(v: Any) -> Any:
        encoded = _json_encode(v)
        # a NUL in a string or key shows as \u0000 (a literal backslash-u0000 in a string too,
        # which only costs that entry the slow path)
        if len(encoded) > max_bytes or b"\\u0000" in encoded:
            return _SLOW
        return encoded.decode()

    return check
