"""Bad rows in a large batch: one bad record costs one record, and only once.

The drain runs in-process (the same code a worker task calls) against the private stack.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from afterwrite.core import wire
from afterwrite.worker.runtime import Runtime
from tests.faults import QUERY_STREAM, Stack, payloads, pg_rows, redis_conn, stored_ids, xadd_all

pytestmark = pytest.mark.acceptance

GOOD = 3_000


def _record(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "created_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "query": "What is write-behind?",
    }
    base.update(fields)
    return base


def test_bad_rows_are_dead_lettered_once_and_the_rest_commit(stack: Stack) -> None:
    good = payloads(GOOD, seed=23)
    twin_id = str(wire.decode(good[10])["id"])
    bad: dict[str, tuple[bytes, str]] = {
        "nul byte": (wire.encode(_record(query="before\x00after")), "nul_byte"),
        "over-size text": (wire.encode(_record(response="x" * 1_000_001)), "too_long"),
        "NaN metric": (wire.encode(_record(response_time_ms=float("nan"))), "not_finite"),
        "string for int": (wire.encode(_record(prompt_tokens="many")), "wrong_type"),
        "int for text": (wire.encode(_record(query=42)), "wrong_type"),
        "unknown field": (wire.encode(_record(colour="blue")), "unknown_field"),
        "not msgpack": (b"\xc1\x00 this is not msgpack", "undecodable"),
        "not a map": (wire.encode([1, 2, 3]), "not_a_map"),
        "bad uuid": (wire.encode(_record(id="not-a-uuid")), "bad_uuid"),
        # Same id as a good record earlier in the batch, different content: the first wins.
        "duplicate id": (wire.encode(_record(id=twin_id, query="impostor")), "duplicate_id"),
    }
    # The same record delivered twice in one batch (a client retry): not an error.
    exact_twin = good[20]
    entries = [*good[:1500], *(raw for raw, _ in bad.values()), exact_twin, *good[1500:]]

    settings = stack.settings(batch_max_entries=5_000)
    rt = Runtime(settings)
    try:
        with redis_conn(stack.redis_url) as r:
            drain = rt.drain("query")
            xadd_all(r, entries)
            first = drain.run(budget_s=60)
            assert first.entries == len(entries)
            assert first.dead_lettered == len(bad)
            assert first.inserted == GOOD
            assert r.xlen(QUERY_STREAM) == 0
            assert not r.xpending_range(QUERY_STREAM, settings.consumer_group, "-", "+", 10)

            good_ids = sorted(str(wire.decode(p)["id"]) for p in good)
            assert sorted(stored_ids(stack.database_url)) == good_ids
            twin_row = pg_rows(
                stack.database_url, "SELECT query FROM query_history WHERE id = %s", (twin_id,)
            )
            assert twin_row == [(wire.decode(good[10])["query"],)]  # not the impostor

            def dead_letters() -> dict[bytes, tuple[str, str, int]]:
                rows = pg_rows(
                    stack.database_url,
                    "SELECT payload_raw, reason, error_code, delivery_count FROM dead_letters",
                )
                return {bytes(raw): (reason, code, n) for raw, reason, code, n in rows}

            # a dead letter keeps at most dead_letter_max_payload_bytes of the payload (the head;
            # its length and sha256 beside it): the over-size text is stored capped
            cap = settings.dead_letter_max_payload_bytes
            stored_raw = {raw[:cap]: code for raw, code in bad.values()}
            expected = {raw: ("invalid", code, 1) for raw, code in stored_raw.items()}
            assert dead_letters() == expected

            # The same entries delivered again (a replay, a redelivery after a crash): the dead
            # letters are counted again, not added again; nothing is inserted.
            xadd_all(r, entries)
            second = drain.run(budget_s=60)
            assert (second.entries, second.inserted) == (len(entries), 0)
            assert dead_letters() == {raw: ("invalid", code, 2) for raw, code in stored_raw.items()}
            assert sorted(stored_ids(stack.database_url)) == good_ids
            assert r.xlen(QUERY_STREAM) == 0
    finally:
        rt.close()
