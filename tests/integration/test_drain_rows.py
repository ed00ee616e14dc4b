"""Through a real drain: every validation code still dead-letters its entry, and values that
need COPY escaping or only RowCodec's forms arrive exactly (the typed fast path and the COPY
text lines, against real Redis and PostgreSQL)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import psycopg
import pytest
import redis

from afterwrite.core import wire
from afterwrite.core.settings import Settings
from afterwrite.worker.runtime import Runtime


@pytest.fixture
def runtime(settings: Settings) -> Any:
    rt = Runtime(settings)
    yield rt
    rt.close()


def _payload(**fields: Any) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "created_at": datetime.now(UTC), "query": "q", **fields}


def _nested(depth: int) -> list[Any]:
    return [] if depth == 0 else [_nested(depth - 1)]


BAD = {
    "not_a_map": [1, 2],
    "missing_field": {"id": str(uuid.uuid4()), "created_at": datetime.now(UTC)},
    "unknown_field": _payload(colour="red"),
    "bad_uuid": _payload(id="not-a-uuid"),
    "bad_timestamp": _payload(created_at="yesterday"),
    "in_the_future": _payload(created_at=datetime.now(UTC) + timedelta(days=30)),
    "wrong_type": _payload(model_ids="gpt-4o"),
    "nul_byte": _payload(response="a\x00b"),
    "too_long": _payload(user_id="u" * 257),
    "out_of_range": _payload(prompt_tokens=-1),
    "not_finite": _payload(metadata={"score": float("inf")}),
    "too_deep": _payload(metadata={"deep": _nested(70)}),
    "server_owned": _payload(ingested_at=datetime.now(UTC)),
}


def test_every_validation_code_still_dead_letters_its_entry(
    runtime: Runtime, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    drain = runtime.drain("query")
    good = [_payload(query=f"good {i}") for i in range(20)]
    sent: dict[bytes, str] = {}
    for code, payload in BAD.items():
        raw = msgspec.msgpack.encode(payload)
        sent[raw] = code
        rdb.xadd(drain.stream.key, {wire.PAYLOAD_FIELD: raw})
    for payload in good:
        rdb.xadd(drain.stream.key, {wire.PAYLOAD_FIELD: wire.encode(payload)})

    report = drain.run(budget_s=5)

    assert (report.inserted, report.dead_lettered) == (len(good), len(BAD))
    stored = {str(r[0]) for r in pg.execute("SELECT id FROM query_history")}
    assert stored == {p["id"] for p in good}
    dead = pg.execute("SELECT payload_raw, error_code FROM dead_letters").fetchall()
    codes = {bytes(raw): code for raw, code in dead}
    assert codes == sent
    assert rdb.xlen(drain.stream.key) == 0


def test_values_arrive_exactly_whichever_path_built_their_row(
    runtime: Runtime, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    created = datetime(2026, 11, 1, 12, 30, 15, 123456, tzinfo=UTC)
    text = "tab\there\nnewline, back\\slash, cr\r, ünïcode ✓, emoji 😀, a literal \\N"
    meta = {"quote": 'say "hi"', "path": "C:\\temp\\n", "u": "\\u0000 is text", "n": [1, -2.5]}
    upper = str(uuid.uuid4())
    whole = created.replace(microsecond=0)  # exact as epoch seconds
    payloads = {
        # what clients send: the typed fast path
        "fast": _payload(query=text, response=text, metadata=meta, created_at=created),
        # forms only RowCodec accepts
        "upper": {"id": upper.upper(), "created_at": whole.timestamp(), "query": text},
        "float_int": _payload(prompt_tokens=3.0, metadata={"deep": _nested(20)}),
    }
    for payload in payloads.values():
        rdb.xadd(runtime.drain("query").stream.key, {wire.PAYLOAD_FIELD: wire.encode(payload)})

    report = runtime.drain("query").run(budget_s=5)

    assert (report.inserted, report.dead_lettered) == (3, 0)
    cur = pg.cursor(row_factory=psycopg.rows.dict_row)
    rows = {str(r["id"]): r for r in cur.execute("SELECT * FROM query_history")}
    fast = rows[payloads["fast"]["id"]]
    assert (fast["query"], fast["response"], fast["metadata"]) == (text, text, meta)
    assert fast["created_at"] == created
    assert fast["model_ids"] == []  # the column's default
    assert rows[upper]["query"] == text
    assert rows[upper]["created_at"] == whole
    other = rows[payloads["float_int"]["id"]]
    assert other["prompt_tokens"] == 3
    assert other["metadata"] == {"deep": _nested(20)}


def test_query_records_take_the_typed_path_unless_a_rule_needs_the_record(
    runtime: Runtime, pg: psycopg.Connection[Any], rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The query kind's validator and its bodies rule are judged on the typed row's values,
    so ordinary records never pay for the checked path (they all did, unnoticed, after the
    privacy work merged: worker CPU per realistic row went from ~20 to ~44 µs)."""
    drain = runtime.drain("query")
    checked: list[Any] = []
    row = drain.codec.row

    def counted(payload: Any, *args: Any, **kwargs: Any) -> Any:
        checked.append(payload)
        return row(payload, *args, **kwargs)

    monkeypatch.setattr(drain.codec, "row", counted)
    ordinary = [_payload(query=f"q{i}", response="r", mode="chat") for i in range(50)]
    bodies_but_not_stored = _payload(query="secret", response="secret", text_stored=False)
    no_bodies = {**_payload(text_stored=False), "query": None}
    no_query = {k: v for k, v in _payload().items() if k != "query"}
    for payload in [*ordinary, bodies_but_not_stored, no_bodies, no_query]:
        rdb.xadd(drain.stream.key, {wire.PAYLOAD_FIELD: wire.encode(payload)})

    report = drain.run(budget_s=5)

    assert (report.inserted, report.dead_lettered) == (52, 1)
    # the two that need a rule's judgement; no ordinary one, nor one already without bodies
    assert {c.get("id") for c in checked} == {bodies_but_not_stored["id"], no_query["id"]}
    for payload in (bodies_but_not_stored, no_bodies):
        stored = pg.execute(
            "SELECT query, response, text_stored FROM query_history WHERE id = %s",
            (payload["id"],),
        ).fetchone()
        assert stored == (None, None, False)  # the worker leaves the bodies out all the same
    code = pg.execute("SELECT error_code FROM dead_letters").fetchone()
    assert code == ("missing_field",)
