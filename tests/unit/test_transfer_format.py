"""The JSON Lines format of export/import, without a database: values, SQL, line decoding."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Boolean, Double, Interval, LargeBinary, Numeric, Text, Uuid
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from afterwrite.models.registry import Kind, kinds
from afterwrite.worker.ingest.rows import Invalid
from afterwrite.worker.operations.transfer import (
    ImportReport,
    LineCodec,
    TransferError,
    Unrepresentable,
    export_column,
    export_query,
    iso_utc,
)


class _Base(DeclarativeBase):
    """Private metadata: these tables must not join the application's models."""


class _Blob(_Base):
    __tablename__ = "test_transfer_blob"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    amount: Mapped[Decimal | None] = mapped_column(Numeric(40, 20))
    ratio: Mapped[float | None] = mapped_column(Double)
    flag: Mapped[bool | None] = mapped_column(Boolean)
    doc: Mapped[Any | None] = mapped_column(JSONB)
    note: Mapped[str | None] = mapped_column(Text)


class _Odd(_Base):
    __tablename__ = "test_transfer_odd"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    wait: Mapped[timedelta | None] = mapped_column(Interval)


BLOB = Kind(name="blob", model=_Blob)
ID = "01a2037d-bc1e-7284-8cfc-0a9ae072e6dc"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "2026-01-02T03:04:05.000000+00:00"),
        (datetime(2026, 1, 2, 3, 4, 5, 6), "2026-01-02T03:04:05.000006+00:00"),  # naive: UTC
        (
            datetime(2026, 1, 2, 1, 0, tzinfo=timezone(timedelta(hours=2))),
            "2026-01-01T23:00:00.000000+00:00",
        ),
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000000+00:00"),
    ],
)
def test_timestamps_are_utc_with_microseconds(value: datetime, text: str) -> None:
    assert iso_utc(value) == text
    assert datetime.fromisoformat(text) == (value if value.tzinfo else value.replace(tzinfo=UTC))


def test_values_json_cannot_hold_are_refused_not_changed() -> None:
    _, ratio = export_column(BLOB.table.c.ratio)
    assert ratio is not None
    assert ratio(0.1) == 0.1
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(Unrepresentable, match="no JSON form"):
            ratio(bad)
    select, amount = export_column(BLOB.table.c.amount)
    assert select.as_string(None) == '"amount"::text'  # every digit, not a double
    assert amount is not None
    assert bytes(amount("-12.50")) == b"-12.50"
    with pytest.raises(Unrepresentable, match="no JSON form"):
        amount("NaN")


def test_the_export_query_reads_every_column_by_id() -> None:
    query, params = export_query(kinds.get("query").table)
    text = query.as_string(None)
    assert text.startswith('SELECT "id"::text, "created_at", ')
    assert '"model_ids"::text' in text
    assert '"metadata"::text' in text
    assert text.endswith('FROM "query_history" ORDER BY id')
    assert params == []
    since = datetime(2026, 1, 1, tzinfo=UTC)
    filtered, params = export_query(kinds.get("query").table, since, None)
    assert filtered.as_string(None).endswith('WHERE "created_at" >= %s ORDER BY id')
    assert params == [since]


def test_time_filters_need_a_created_at_column() -> None:
    export_query(BLOB.table)  # no filter: fine
    with pytest.raises(TransferError, match="has no created_at column"):
        export_query(BLOB.table, until=datetime.now(UTC))


def test_types_afterwrite_cannot_store_are_refused() -> None:
    with pytest.raises(TransferError, match=r"test_transfer_odd\.wait: type"):
        export_column(Kind(name="odd", model=_Odd).table.c.wait)


def _row(codec: LineCodec, line: bytes) -> dict[str, Any]:
    return dict(zip(codec.codec.columns, codec.row(line, codec.decode(line)), strict=True))


def test_exact_columns_keep_the_files_text() -> None:
    codec = LineCodec(BLOB)
    big = b"1" + b"0" * 400  # how PostgreSQL writes 1e400
    line = (
        b'{"id": "%s", "amount": 0.10000000000000000001, "ratio": 1e-300, '
        b'"doc": {"x": 0.1000000000000000000001, "big": %s}, "data": "AAH/", "flag": true}'
        % (ID.encode(), big)
    )
    row = _row(codec, line)
    assert row["amount"] == "0.10000000000000000001"
    assert row["doc"] == f'{{"x": 0.1000000000000000000001, "big": {big.decode()}}}'
    assert row["ratio"] == 1e-300
    assert row["data"] == b"\x00\x01\xff"
    assert row["flag"] is True
    assert row["note"] is None


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b'{"id": "x"', "not_json"),
        (b'{"id": "\\ud800"}', "not_json"),
        (b"\xff", "not_json"),
        (b"null", "not_a_map"),
        (b'{"id": "%s", "data": "not base64!"}' % ID.encode(), "bad_base64"),
        (b'{"id": "%s", "doc": {"k": "a\\u0000b"}}' % ID.encode(), "nul_byte"),
        (b'{"id": "%s", "ratio": "1.5"}' % ID.encode(), "wrong_type"),
        (b'{"id": "%s", "extra": 1}' % ID.encode(), "unknown_field"),
    ],
)
def test_lines_that_can_never_be_stored(line: bytes, code: str) -> None:
    codec = LineCodec(BLOB)
    with pytest.raises(Invalid) as caught:
        codec.row(line, codec.decode(line))
    assert caught.value.code == code


def test_the_kinds_validate_hook_runs() -> None:
    def validate(payload: dict[str, Any]) -> None:
        if payload.get("note") == "no":
            exc = ValueError("note says no")
            exc.code = "said_no"  # type: ignore[attr-defined]
            raise exc

    codec = LineCodec(Kind(name="blob", model=_Blob, validate=validate))
    line = b'{"id": "%s", "note": "no"}' % ID.encode()
    with pytest.raises(Invalid) as caught:
        codec.row(line, codec.decode(line))
    assert (caught.value.code, caught.value.detail) == ("said_no", "note says no")


def test_report_as_dict() -> None:
    report = ImportReport("query", lines=3, inserted=1, duplicates=1, dead_lettered=1)
    assert report.as_dict() == {
        "kind": "query",
        "lines": 3,
        "inserted": 1,
        "duplicates": 1,
        "dead_lettered": 1,
        "batches": 0,
        "codes": {},
    }
