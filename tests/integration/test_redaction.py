"""Redaction and bodies left out, end to end: producer → Redis → drain → PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import redis

from afterwrite.core import wire
from afterwrite.core.errors import ConfigurationError
from afterwrite.core.settings import Settings, load_settings
from afterwrite.demo.services import Endpoints
from afterwrite.producer import Client, Outcome
from afterwrite.producer.client import redis_options
from afterwrite.worker.ingest import privacy
from afterwrite.worker.runtime import Runtime

PII = (
    "I am ann@example.org, card 4111 1111 1111 1111, phone +1 (555) 123-4567, "
    "key sk-proj-Abcdefghijklmnop1234, from 203.0.113.9 / 2001:db8::1, Alice Liddell"
)
REDACTED = "I am <EMAIL>, card <CARD>, phone <PHONE>, key <SECRET>, from <IP> / <IP>, "
RAW_BITS = ("ann@example.org", "4111 1111", "123-4567", "sk-proj", "203.0.113.9", "2001:db8::1")


def _settings(endpoints: Endpoints, tmp_path: Any, **overrides: Any) -> Settings:
    return load_settings(
        {},
        database_url=endpoints.database_url,
        redis_url=endpoints.redis_url,
        data_dir=tmp_path / "data",
        **overrides,
    )


@pytest.fixture
def make(endpoints: Endpoints, tmp_path: Any) -> Iterator[Any]:
    made: list[Runtime] = []

    def build(**overrides: Any) -> tuple[Client, Runtime]:
        s = _settings(endpoints, tmp_path, **overrides)
        client = Client(redis.Redis.from_url(s.require_redis_url(), **redis_options(s)), s)
        rt = Runtime(s)
        made.append(rt)
        return client, rt

    yield build
    for rt in made:
        rt.close()


def _one(pg: psycopg.Connection[Any], query: str, *args: Any) -> dict[str, Any]:
    cur = pg.cursor(row_factory=psycopg.rows.dict_row)
    row = cur.execute(query, args).fetchone()
    assert row is not None
    return row


def _dead_letter(pg: psycopg.Connection[Any]) -> tuple[Any, bytes, str]:
    row: Any = pg.execute("SELECT payload, payload_raw, error_code FROM dead_letters").fetchone()
    return row[0], bytes(row[1]), row[2]


def _nowhere(pg: psycopg.Connection[Any], *bits: str) -> None:
    """None of ``bits`` is in any stored row, dead letter (decoded, raw or detail) or job."""
    for bit in bits:
        found = pg.execute(
            "SELECT (SELECT count(*) FROM query_history WHERE q::text LIKE %(b)s)"
            " + (SELECT count(*) FROM embedding_jobs j WHERE j::text LIKE %(b)s)"
            " + (SELECT count(*) FROM dead_letters d WHERE (d.payload::text || d.detail) LIKE %(b)s"
            "    OR position(convert_to(%(raw)s, 'UTF8') in d.payload_raw) > 0)"
            " FROM (SELECT 1) one LEFT JOIN query_history q ON false",
            {"b": f"%{bit}%", "raw": bit},
        ).fetchone()
        assert found is not None
        assert found[0] == 0, f"{bit!r} was stored"


def test_rows_hold_placeholders_and_say_which_redactors_ran(
    make: Any, pg: psycopg.Connection[Any]
) -> None:
    client, rt = make(
        redact={"query.query": "all", "query.metadata": "email", "embed.text": "all"},
        redactor="tests.redactors:names",
    )
    rid = client.record_query(
        PII, response="reply to ann@example.org", metadata={"cc": ["bob@example.org"]}
    )
    client.embed("docs", "d1", PII)
    assert rt.drain("query").run(budget_s=5).inserted == 1
    assert rt.drain("embed").run(budget_s=5).inserted == 1

    row = _one(pg, "SELECT * FROM query_history WHERE id = %s", rid)
    assert row["query"] == REDACTED + "<NAME>"
    assert row["redacted_by"] == ["card", "custom", "email", "ip", "phone", "secret"]
    assert row["metadata"] == {"cc": ["<EMAIL>"]}
    assert row["response"] == "reply to ann@example.org"  # no rule for this field
    job = _one(pg, "SELECT text FROM embedding_jobs")
    assert job["text"] == row["query"]


def test_a_kind_without_rules_is_stored_as_sent(make: Any, pg: psycopg.Connection[Any]) -> None:
    client, rt = make(redact={"embed.text": "all"})
    rid = client.record_query(PII)
    rt.drain("query").run(budget_s=5)
    row = _one(pg, "SELECT query, redacted_by FROM query_history WHERE id = %s", rid)
    assert (row["query"], row["redacted_by"]) == (PII, None)


def test_a_raising_redactor_dead_letters_the_record_without_its_content(
    make: Any, pg: psycopg.Connection[Any]
) -> None:
    client, rt = make(redact={"query.query": "custom"}, redactor="tests.redactors:explode")
    good = client.record_query("   ")  # nothing to redact? the hook still raises on it
    bad = client.record_query(PII)
    report = rt.drain("query").run(budget_s=5)
    assert (report.entries, report.inserted, report.dead_lettered) == (2, 0, 2)
    dead = pg.execute(
        "SELECT error_code, payload, length(payload_raw), detail FROM dead_letters"
    ).fetchall()
    assert len(dead) == 2  # one per entry, not merged into one
    for code, payload, raw_bytes, detail in dead:
        assert code == "redaction_failed"
        assert payload is None or "afterwrite_truncated" in payload
        assert raw_bytes == 0
        assert "RuntimeError" in detail
    _nowhere(pg, *RAW_BITS, "Alice")
    assert {good, bad}.isdisjoint(str(r[0]) for r in pg.execute("SELECT id FROM query_history"))
    assert rt.redis.xlen(rt.drain("query").stream.key) == 0  # acknowledged: not retried


def test_dead_letters_are_redacted_and_keep_raw_bytes_only_when_allowed(
    make: Any, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    bad = {"id": str(uuid.uuid4()), "created_at": datetime.now(UTC), "query": PII + "\x00"}
    key = wire.stream_key("afterwrite", "query")

    _, rt = make(redact={"query.query": "all"})
    rdb.xadd(key, {wire.PAYLOAD_FIELD: wire.encode(bad)})
    assert rt.drain("query").run(budget_s=5).dead_lettered == 1
    payload, raw, code = _dead_letter(pg)
    assert code == "nul_byte"
    assert payload["query"].startswith(REDACTED)
    # replayable, redacted
    assert wire.decode(raw)["query"] == REDACTED + "Alice Liddell\x00"
    _nowhere(pg, *RAW_BITS)

    pg.execute("TRUNCATE dead_letters")
    _, rt = make(redact={"query.query": "all"}, dead_letter_keep_raw=True)
    rdb.xadd(key, {wire.PAYLOAD_FIELD: wire.encode(bad)})
    assert rt.drain("query").run(budget_s=5).dead_lettered == 1
    payload, raw, _ = _dead_letter(pg)
    assert "<EMAIL>" in payload["query"]  # the readable copy is still redacted
    assert wire.decode(raw)["query"] == PII + "\x00"  # the bytes, as allowed


def test_producer_side_redaction_keeps_raw_text_out_of_redis(
    make: Any, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    client, rt = make(redact={"query.query": "email+card"}, producer_redact=True)
    rid = client.record_query(PII)
    entries: Any = rdb.xrange(wire.stream_key("afterwrite", "query"))
    [(_, fields)] = entries
    sent = wire.decode(fields[wire.PAYLOAD_FIELD])
    assert "ann@example.org" not in sent["query"]
    assert sent["redacted_by"] == ["card", "email"]
    rt.drain("query").run(budget_s=5)
    row = _one(pg, "SELECT query, redacted_by FROM query_history WHERE id = %s", rid)
    assert row["query"].startswith("I am <EMAIL>, card <CARD>, phone +1 (555)")
    assert row["redacted_by"] == ["card", "email"]


def test_a_raising_producer_redactor_sends_nothing_raw(
    make: Any, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    client, _ = make(
        redact={"query.query": "custom"}, redactor="tests.redactors:explode", producer_redact=True
    )
    receipt = client.record_query(PII)
    assert receipt.outcome is Outcome.INVALID
    entries: Any = rdb.xrange(wire.stream_key("afterwrite", "query"))
    [(_, fields)] = entries
    assert b"ann@example.org" not in fields[wire.PAYLOAD_FIELD]


def test_rules_naming_what_does_not_exist_stop_the_worker(
    endpoints: Endpoints, tmp_path: Any
) -> None:
    from afterwrite.worker.app import check_kind_settings

    for rules, message in [
        ({"nosuch.text": "all"}, "unknown kind 'nosuch'"),
        ({"query.answer": "all"}, "kind 'query' has no text field 'answer'"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            check_kind_settings(_settings(endpoints, tmp_path, redact=rules))
    hooked = _settings(
        endpoints, tmp_path, redact={"query.query": "all"}, redactor="nosuch_module:f"
    )
    with pytest.raises(ConfigurationError, match="cannot import 'nosuch_module'"):
        privacy.check(hooked)
