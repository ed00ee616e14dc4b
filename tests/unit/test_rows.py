"""Validation derived from the table: what PostgreSQL would refuse is caught before it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from afterwrite.models import QueryHistory
from afterwrite.models.registry import kinds
from afterwrite.worker.ingest.rows import MAX_TEXT_CHARS, Invalid, RowCodec

codec = RowCodec(kinds.get("query").table)
ID = "01a2037d-bc1e-7284-8cfc-0a9ae072e6dc"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def good(**extra: Any) -> dict[str, Any]:
    return {"id": ID, "created_at": NOW, "query": "hi", **extra}


def nested(depth: int) -> list[Any]:
    return [] if depth == 0 else [nested(depth - 1)]


def row(payload: dict[str, Any]) -> dict[str, Any]:
    return dict(zip(codec.columns, codec.row(payload), strict=True))


def test_columns_follow_the_table() -> None:
    # PostgreSQL computes the first, the insert the second (AFTERWRITE_SEARCH_RESPONSES): a
    # record never carries them
    generated = {"search_vector", "response_search_vector"}
    assert codec.columns == tuple(
        c.name for c in QueryHistory.__table__.columns if c.name not in generated
    )


@pytest.mark.parametrize("column", ["search_vector", "response_search_vector"])
def test_a_generated_column_is_an_unknown_field(column: str) -> None:
    with pytest.raises(Invalid) as exc:
        codec.row(good(**{column: "'x':1"}))
    assert exc.value.code == "unknown_field"


def test_a_good_payload_becomes_a_row() -> None:
    r = row(good(model_ids=["a"], metadata={"k": [1, 2.5, None, True]}, prompt_tokens=3.0))
    assert r["id"] == ID
    assert r["created_at"] == NOW
    assert r["model_ids"] == '["a"]'
    assert r["metadata"] == '{"k":[1,2.5,null,true]}'
    assert r["prompt_tokens"] == 3
    assert r["response"] is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (NOW, NOW),
        (datetime(2026, 11, 22, 12, 0), NOW),  # naive: taken as UTC
        (NOW.timestamp(), NOW),
        ("2026-11-22T12:00:00+00:00", NOW),
    ],
)
def test_timestamps_in_several_forms(value: Any, expected: datetime) -> None:
    assert row(good(created_at=value))["created_at"] == expected


def test_uuid_forms() -> None:
    assert row(good(id=uuid.UUID(ID).bytes))["id"] == ID
    assert row(good(id=ID.upper()))["id"] == ID


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ([1, 2], "not_a_map"),
        ({"created_at": NOW, "query": "x"}, "missing_field"),
        (good(colour="red"), "unknown_field"),
        (good(id="not-a-uuid"), "bad_uuid"),
        (good(created_at="yesterday"), "bad_timestamp"),
        (good(created_at=1e20), "bad_timestamp"),
        (good(query=5), "wrong_type"),
        (good(query="a\x00b"), "nul_byte"),
        (good(query="x" * (MAX_TEXT_CHARS + 1)), "too_long"),
        (good(user_id="u" * 257), "too_long"),
        (good(prompt_tokens=True), "wrong_type"),
        (good(prompt_tokens=1.5), "wrong_type"),
        (good(prompt_tokens=2**31), "out_of_range"),
        (good(response_time_ms=float("nan")), "not_finite"),
        (good(response_time_ms=float("inf")), "not_finite"),
        (good(response_time_ms="fast"), "wrong_type"),
        (good(metadata={"a": float("nan")}), "not_finite"),
        (good(metadata={"a": "x\x00"}), "nul_byte"),
        (good(metadata={1: "int key"}), "wrong_type"),
        (good(metadata={"b": b"bytes"}), "wrong_type"),
        (good(metadata={"deep": nested(70)}), "too_deep"),
    ],
)
def test_bad_payloads_are_invalid_with_a_code(payload: Any, code: str) -> None:
    with pytest.raises(Invalid) as info:
        codec.row(payload)
    assert info.value.code == code


def test_a_query_needs_its_text_unless_recorded_without_bodies() -> None:
    from afterwrite.models.query_history import QueryError, validate_query

    with pytest.raises(QueryError) as info:
        validate_query(good(query=None))
    assert info.value.code == "missing_field"
    validate_query(good(query=None, text_stored=False))  # store_text=False: accepted


def test_error_detail_names_the_field() -> None:
    with pytest.raises(Invalid, match=r"^prompt_tokens: "):
        codec.row(good(prompt_tokens="x"))
