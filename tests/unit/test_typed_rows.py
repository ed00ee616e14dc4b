"""The typed fast path builds exactly RowCodec's row, or leaves the entry to RowCodec."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from afterwrite.core import wire
from afterwrite.demo import traffic
from afterwrite.models.registry import kinds
from afterwrite.worker.ingest.rows import Invalid, RowCodec
from afterwrite.worker.ingest.typed import JSON_FAST_DEPTH, TypedCodec
from tests.unit.test_rows import ID, NOW, good, nested

TABLE = kinds.get("query").table
slow = RowCodec(TABLE)
fast = TypedCodec(TABLE)


def both(payload: Any) -> tuple[tuple[Any, ...] | None, tuple[Any, ...] | None]:
    raw = msgspec.msgpack.encode(payload)
    try:
        expected: tuple[Any, ...] | None = slow.row(wire.decode(raw))
    except Invalid:
        expected = None
    return expected, fast.row(raw)


def test_what_clients_send_takes_the_fast_path_and_gives_rowcodecs_row() -> None:
    for kw in traffic.queries(500, seed=11):
        raw = wire.encode(traffic.as_record(kw))
        row = fast.row(raw)
        assert row is not None
        assert row == slow.row(wire.decode(raw))


@pytest.mark.parametrize(
    "payload",
    [
        good(response="tab\there, newline\nthere, back\\slash, cr\r, ünïcode ✓"),
        good(metadata={"quote": 'say "hi"', "path": "C:\\temp", "n": [1, -2.5, None, True]}),
        good(retrieval=[{"a": {"b": {"c": []}}}], model_ids=[]),
        good(response_time_ms=0, prompt_tokens=0, completion_tokens=2**31 - 1),
        good(metadata={"deep": nested(JSON_FAST_DEPTH - 2)}),  # JSON_FAST_DEPTH containers
        good(user_id="u" * 256, mode=None),
        # no bodies: both codecs build the row; the kind's validator (run by the drain after
        # either) refuses a NULL query unless text_stored is false
        good(query=None, response=None, text_stored=False),
        good(redacted_by=["email", "card"]),
    ],
)
def test_accepted_payloads_give_the_same_row(payload: dict[str, Any]) -> None:
    expected, row = both(payload)
    assert row is not None
    assert row == expected


@pytest.mark.parametrize(
    "payload",
    [
        good(id=ID.upper()),  # RowCodec normalises it
        good(id=uuid.UUID(ID).bytes),
        good(created_at=NOW.timestamp()),
        good(created_at=datetime(2026, 11, 22, 12, 0)),  # naive: RowCodec takes it as UTC
        good(prompt_tokens=3.0),
        good(metadata={"deep": nested(JSON_FAST_DEPTH + 3)}),
        good(metadata={"text": "a literal \\u0000, not a NUL"}),
    ],
)
def test_other_accepted_forms_are_left_to_rowcodec(payload: dict[str, Any]) -> None:
    expected, row = both(payload)
    assert expected is not None
    assert row is None


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2],
        {"created_at": NOW, "query": "x"},
        good(colour="red"),
        good(id="not-a-uuid"),
        good(created_at="yesterday"),
        good(created_at=datetime.now(UTC) + timedelta(days=3)),
        good(query=5),
        good(query="a\x00b"),
        good(user_id="u" * 257),
        good(prompt_tokens=True),
        good(prompt_tokens=1.5),
        good(prompt_tokens=-1),
        good(prompt_tokens=2**31),
        good(response_time_ms=float("nan")),
        good(response_time_ms=float("-inf")),
        good(response_time_ms=-0.5),
        good(model_ids="gpt-4o"),
        good(model_ids=["a", 1]),
        good(model_ids=["a\x00"]),
        good(metadata={"a": float("nan")}),
        good(metadata={"a": "x\x00"}),
        good(metadata={"x\x00": 1}),
        good(metadata={1: "int key"}),
        good(metadata={"b": b"bytes"}),
        good(metadata={"deep": nested(70)}),
        good(ingested_at=NOW),
    ],
)
def test_what_rowcodec_refuses_never_passes_the_fast_path(payload: Any) -> None:
    expected, row = both(payload)
    assert expected is None
    assert row is None


def test_fuzzed_payloads_agree() -> None:
    """Random mixes of good and bad values: the fast path never builds a row RowCodec would
    refuse or build differently."""
    rng = random.Random(5)
    values: dict[str, list[Any]] = {
        "query": ["q", "", "a\tb", "a\x00", 3, None, "x" * 300],
        "user_id": ["u", "u" * 256, "u" * 257, None, b"u", 1.0],
        "mode": ["chat", None, "m" * 65, ["chat"]],
        "model_ids": [["a"], [], ["a", "b\\"], "a", [1], None, {"a": 1}],
        "response_time_ms": [1, 1.5, -1.0, float("inf"), True, None, "1"],
        "prompt_tokens": [0, 7, -3, 2.0, 2.5, 2**40, None, False],
        "metadata": [{}, {"k": "v"}, {"k": [1, {"z": None}]}, {2: 1}, [1, 2], "s", 1e308],
        "created_at": [NOW, NOW.timestamp(), NOW.isoformat(), "x", 10**18, -5.5],
    }
    for _ in range(3000):
        payload = good()
        for name, options in values.items():
            if rng.random() < 0.4:
                payload[name] = rng.choice(options)
        expected, row = both(payload)
        if row is not None:
            assert row == expected, payload
