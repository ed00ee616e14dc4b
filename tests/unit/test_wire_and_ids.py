from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest

from afterwrite import wire
from afterwrite.ids import uuid7, uuid7_str, uuid7_unix_ms
from producer.records import Outcome, Receipt, query_record


def test_uuid7_is_version_7_time_ordered_and_unique() -> None:
    ids = [uuid7_str() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    # strictly increasing within a process, even many ids per millisecond
    assert ids == sorted(ids)
    assert [uuid.UUID(i) for i in ids] == sorted(uuid.UUID(i) for i in ids)
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    stamps = [uuid7_unix_ms(u) for u in parsed]
    assert stamps == sorted(stamps)
    assert abs(stamps[-1] - time.time() * 1000) < 5_000
    assert uuid7_unix_ms(uuid7(unix_ms=1_700_000_000_000)) == 1_700_000_000_000


def test_records_round_trip_through_the_wire_format() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    record = query_record(
        "q",
        event_id=None,
        response="a",
        user_id="u",
        session_id=None,
        mode="rag",
        model_ids=("m1", "m2"),
        response_time_ms=12.5,
        prompt_tokens=3,
        completion_tokens=None,
        retrieval={"chunks": [1, 2]},
        metadata=None,
        created_at=now,
    )
    decoded = wire.decode(wire.encode(record))
    assert "session_id" not in decoded  # None values are left out: smaller entries
    assert decoded == {
        "id": record.id,
        "created_at": now,
        "query": "q",
        "response": "a",
        "user_id": "u",
        "mode": "rag",
        "model_ids": ["m1", "m2"],
        "response_time_ms": 12.5,
        "prompt_tokens": 3,
        "retrieval": {"chunks": [1, 2]},
    }


def test_str_subclasses_encode_as_plain_strings() -> None:
    receipt = Receipt("abc", Outcome.SENT)
    assert wire.decode(wire.encode({"id": receipt})) == {"id": "abc"}


def test_unencodable_values_raise_encode_error() -> None:
    with pytest.raises(wire.EncodeError):
        wire.encode({"q": "lone \udc00 surrogate"})
    with pytest.raises(wire.EncodeError):
        wire.encode({"q": object()})


def test_entry_id_carries_enqueue_time() -> None:
    assert wire.entry_ms(b"1700000000123-4") == 1_700_000_000_123
    assert wire.stream_key("aw", "query") == "aw:stream:query"
