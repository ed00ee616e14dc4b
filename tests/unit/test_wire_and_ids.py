from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import pytest

from afterwrite.core import wire
from afterwrite.core.ids import uuid7, uuid7_str, uuid7_unix_ms
from afterwrite.producer.records import Outcome, Receipt, query_record


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


FORK_CHECK = """
import os, uuid
from afterwrite.core.ids import uuid7_str, uuid7_unix_ms
shared = 0
for _ in range(100):
    r, w = os.pipe()
    before = uuid7_str()
    pid = os.fork()
    if pid == 0:
        os.write(w, uuid7_str().encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        child = f.read().decode()
    os.waitpid(pid, 0)
    assert child != before
    shared += uuid7_unix_ms(uuid.UUID(child)) == uuid7_unix_ms(uuid.UUID(before))
print(shared)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_continues_its_parents_id_stream() -> None:
    """Parent and child inherit the generator's millisecond and counter; the child's first id
    is from a later millisecond, so its counter is seeded afresh. In a small process a fork
    takes well under a millisecond (without the wait, ~40 of these 100 children shared it)."""
    out = subprocess.run(
        [sys.executable, "-c", FORK_CHECK], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "0"


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
