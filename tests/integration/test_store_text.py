"""Records stored without bodies: ``record_query(store_text=False)`` and the per-mode and
per-model settings. Real Redis and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from afterwrite.core import wire
from afterwrite.core.settings import load_settings
from afterwrite.demo.services import Endpoints
from afterwrite.producer import Client
from afterwrite.producer.client import redis_options
from afterwrite.worker.runtime import Runtime

BODY = "my card is 4111 1111 1111 1111, and my question is private"
ANSWER = "the private answer"


@pytest.fixture
def make(endpoints: Endpoints, tmp_path: Any) -> Iterator[Any]:
    made: list[Runtime] = []

    def build(**overrides: Any) -> tuple[Client, Runtime]:
        s = load_settings(
            {},
            database_url=endpoints.database_url,
            redis_url=endpoints.redis_url,
            data_dir=tmp_path / "data",
            **overrides,
        )
        rt = Runtime(s)
        made.append(rt)
        return Client(redis.Redis.from_url(s.require_redis_url(), **redis_options(s)), s), rt

    yield build
    for rt in made:
        rt.close()


def _rows(pg: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    cur = pg.cursor(row_factory=psycopg.rows.dict_row)
    return {str(r["id"]): r for r in cur.execute("SELECT * FROM query_history")}


def _no_bodies_anywhere(pg: psycopg.Connection[Any]) -> None:
    for text in (BODY, ANSWER):
        n = pg.execute(
            "SELECT (SELECT count(*) FROM query_history q WHERE q::text LIKE %(t)s)"
            " + (SELECT count(*) FROM dead_letters d WHERE d.payload::text LIKE %(t)s"
            "    OR position(convert_to(%(raw)s, 'UTF8') in d.payload_raw) > 0)",
            {"t": f"%{text[:20]}%", "raw": text[:20]},
        ).fetchone()
        assert n == (0,), f"{text!r} was stored"


def test_store_text_false_keeps_the_metadata_and_never_sends_the_bodies(
    make: Any, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    client, rt = make()
    rid = client.record_query(
        BODY,
        response=ANSWER,
        user_id="u-1",
        session_id="s-1",
        mode="chat",
        model_ids=["gpt-4o"],
        response_time_ms=120.0,
        prompt_tokens=30,
        completion_tokens=12,
        metadata={"tenant": "acme"},
        store_text=False,
    )
    kept = client.record_query(BODY, response=ANSWER, user_id="u-1")
    entries: Any = rdb.xrange(wire.stream_key("afterwrite", "query"))
    assert b"private" not in entries[0][1][wire.PAYLOAD_FIELD]  # not even in Redis
    assert rt.drain("query").run(budget_s=5).inserted == 2

    row = _rows(pg)[rid]
    assert (row["query"], row["response"], row["text_stored"]) == (None, None, False)
    assert (row["user_id"], row["session_id"], row["mode"]) == ("u-1", "s-1", "chat")
    assert row["model_ids"] == ["gpt-4o"]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (30, 12)
    assert (row["response_time_ms"], row["metadata"]) == (120.0, {"tenant": "acme"})
    other = _rows(pg)[kept]
    assert (other["query"], other["response"], other["text_stored"]) == (BODY, ANSWER, True)


def test_modes_and_models_in_the_settings_are_stored_without_bodies(
    make: Any, pg: psycopg.Connection[Any]
) -> None:
    client, rt = make(no_text_modes=("support",), no_text_models=("private-llm",))
    by_mode = client.record_query(BODY, response=ANSWER, mode="support")
    by_model = client.record_query(BODY, response=ANSWER, model_ids=["gpt-4o", "private-llm"])
    normal = client.record_query("hello", response="hi", mode="chat", model_ids=["gpt-4o"])
    rt.drain("query").run(budget_s=5)
    rows = _rows(pg)
    for rid in (by_mode, by_model):
        assert (rows[rid]["query"], rows[rid]["response"], rows[rid]["text_stored"]) == (
            None,
            None,
            False,
        )
    assert (rows[normal]["query"], rows[normal]["text_stored"]) == ("hello", True)
    _no_bodies_anywhere(pg)


def test_dead_letters_of_such_records_carry_no_bodies_even_with_raw_bytes_allowed(
    make: Any, pg: psycopg.Connection[Any]
) -> None:
    client, rt = make(no_text_modes=("support",), dead_letter_keep_raw=True)
    # both invalid (negative token count): dead-lettered, not stored
    client.record_query(BODY, response=ANSWER, prompt_tokens=-1, store_text=False)
    client.record_query(BODY, response=ANSWER, prompt_tokens=-1, mode="support")
    report = rt.drain("query").run(budget_s=5)
    assert (report.inserted, report.dead_lettered) == (0, 2)
    dead = pg.execute("SELECT error_code, payload, payload_raw FROM dead_letters").fetchall()
    assert len(dead) == 2
    for code, payload, raw in dead:
        assert code == "out_of_range"
        assert payload["text_stored"] is False
        assert {"query", "response"}.isdisjoint(payload)
        decoded = wire.decode(bytes(raw))  # replayable, without bodies
        assert {"query", "response"}.isdisjoint(decoded)
    _no_bodies_anywhere(pg)
