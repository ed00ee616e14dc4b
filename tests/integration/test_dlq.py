"""The dead-letter store from the command line: list, show, replay, purge."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import redis
from click.testing import CliRunner
from rich.console import Console

from afterwrite.cli.main import main
from afterwrite.core import wire
from afterwrite.core.settings import Settings
from afterwrite.worker.ingest import dead_letters
from afterwrite.worker.operations.dead_letter_admin import parse_time
from afterwrite.worker.runtime import Runtime


@pytest.fixture
def env(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("AFTERWRITE_")]:
        monkeypatch.delenv(key)
    for key, value in base_env.items():
        if key.startswith("AFTERWRITE_"):
            monkeypatch.setenv(key, value)


def _poison(rdb: redis.Redis, settings: Settings) -> dict[str, str]:
    """Dead-letter three entries through a real drain; returns event id by case."""
    key = wire.stream_key(settings.stream_prefix, "query")
    now = datetime.now(UTC)
    cases = {
        "long_mode": {"id": str(uuid.uuid4()), "created_at": now, "query": "q", "mode": "m" * 80},
        "nul": {"id": str(uuid.uuid4()), "created_at": now, "query": "a\x00b"},
        "type": {"id": str(uuid.uuid4()), "created_at": now, "query": 7},
    }
    for payload in cases.values():
        rdb.xadd(key, {wire.PAYLOAD_FIELD: wire.encode(payload)})
    rt = Runtime(settings)
    try:
        assert rt.drain("query").run(budget_s=5).dead_lettered == 3
    finally:
        rt.close()
    return {name: str(p["id"]) for name, p in cases.items()}


def _invoke(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_list_and_show_with_filters(
    env: None, settings: Settings, rdb: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    ids = _poison(rdb, settings)
    listed = json.loads(_invoke("dlq", "list", "--json").output)
    assert listed["total"] == 3
    assert {r["error_code"] for r in listed["dead_letters"]} == {
        "too_long",
        "nul_byte",
        "wrong_type",
    }

    only_nul = json.loads(_invoke("dlq", "list", "--reason", "nul_byte", "--json").output)
    assert [r["event_id"] for r in only_nul["dead_letters"]] == [ids["nul"]]
    assert json.loads(_invoke("dlq", "list", "--since", "1h", "--json").output)["total"] == 3
    assert json.loads(_invoke("dlq", "list", "--until", "1h", "--json").output)["total"] == 0
    assert json.loads(_invoke("dlq", "list", "--kind", "other", "--json").output)["total"] == 0

    dead_id = only_nul["dead_letters"][0]["id"]
    shown = json.loads(_invoke("dlq", "show", str(dead_id)).output)
    assert shown["payload"]["query"] == "a\\u0000b"  # NUL shown escaped; exact bytes kept
    assert shown["payload_bytes"] > 0
    assert "nul_byte" in _invoke("dlq", "list").output

    missing = CliRunner().invoke(main, ["dlq", "show", "999999"])
    assert missing.exit_code == 1


def test_replay_revalidates_requeues_and_is_idempotent(
    env: None, settings: Settings, rdb: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    ids = _poison(rdb, settings)
    # The operator widens the column: the over-long mode is valid now, the others are not.
    pg.execute("ALTER TABLE query_history ALTER COLUMN mode TYPE varchar(128)")
    from afterwrite.models import QueryHistory

    column = QueryHistory.__table__.c.mode
    original = column.type.length  # type: ignore[attr-defined]
    column.type.length = 128  # type: ignore[attr-defined]
    try:
        dry = _invoke("dlq", "replay", "--dry-run").output
        assert "would replay 1; still invalid 2" in dry
        assert pg.execute("SELECT count(*) FROM dead_letters").fetchone() == (3,)

        assert "replayed 1; still invalid 2" in _invoke("dlq", "replay").output
        assert pg.execute("SELECT count(*) FROM dead_letters").fetchone() == (2,)
        # replaying the same entry again (e.g. after a crash between XADD and DELETE)
        key = wire.stream_key(settings.stream_prefix, "query")
        entries: Any = rdb.xrange(key)
        raw = entries[0][1][wire.PAYLOAD_FIELD]
        rdb.xadd(key, {wire.PAYLOAD_FIELD: raw})
        rt = Runtime(settings)
        try:
            report = rt.drain("query").run(budget_s=5)
        finally:
            rt.close()
        assert (report.entries, report.inserted) == (2, 1)
        rows = pg.execute("SELECT id::text FROM query_history").fetchall()
        assert rows == [(ids["long_mode"],)]
    finally:
        column.type.length = original  # type: ignore[attr-defined]
        pg.execute("TRUNCATE query_history")
        pg.execute("ALTER TABLE query_history ALTER COLUMN mode TYPE varchar(64)")


def test_a_huge_payload_is_stored_capped_and_cannot_be_replayed(
    env: None,
    settings: Settings,
    rdb: redis.Redis,
    pg: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dead_letters.payload_cap.cache_clear()
    monkeypatch.setattr(dead_letters, "payload_cap", lambda: dead_letters.MAX_PAYLOAD_BYTES)
    key = wire.stream_key(settings.stream_prefix, "query")
    huge = {"id": str(uuid.uuid4()), "created_at": datetime.now(UTC), "query": "x" * 10_000_000}
    whole = wire.encode(huge)
    small = {"id": str(uuid.uuid4()), "created_at": datetime.now(UTC), "query": "a\x00b"}
    rdb.xadd(key, {wire.PAYLOAD_FIELD: whole})
    rdb.xadd(key, {wire.PAYLOAD_FIELD: wire.encode(small)})
    rt = Runtime(settings)
    try:
        assert rt.drain("query").run(budget_s=10).dead_lettered == 2
    finally:
        rt.close()
    row = pg.execute(
        "SELECT id, payload_raw, payload_sha256, payload, error_code FROM dead_letters"
        " WHERE event_id = %s",
        (huge["id"],),
    ).fetchone()
    assert row is not None
    dead_id, raw, sha, payload, code = row
    assert code == "too_long"
    assert bytes(raw) == whole[: 64 * 1024]  # the head only
    assert bytes(sha) == hashlib.sha256(whole).digest()  # of the whole
    assert payload == {
        "afterwrite_truncated": {
            "bytes": len(whole),
            "stored_bytes": 64 * 1024,
            "sha256": hashlib.sha256(whole).hexdigest(),
        }
    }
    shown = json.loads(_invoke("dlq", "show", str(dead_id)).output)
    assert shown["payload_capped"] is True
    assert shown["payload_bytes"] == len(whole)

    # The operator lifts the limit: the capped entry would be valid now, yet cannot be replayed.
    rdb.delete(key)
    from afterwrite.models import QueryHistory

    column = QueryHistory.__table__.c.query
    monkeypatch.setitem(column.info, "max_chars", 20_000_000)
    out = _invoke("dlq", "replay").output
    assert f"#{dead_id}: cannot be replayed: only the first 65,536 bytes" in out
    assert "capped 1" in out
    entries: Any = rdb.xrange(key)
    assert [e[1][wire.PAYLOAD_FIELD] for e in entries] == []  # nothing re-sent for it...
    assert pg.execute("SELECT count(*) FROM dead_letters").fetchone() == (2,)  # ...and kept


def test_dead_letters_are_stored_whole_below_the_cap(pg: psycopg.Connection[Any]) -> None:
    entry = dead_letters.DeadEntry("query", "1-0", b"0123456789", {"a": 1}, "invalid", "x", "d")
    with pg.transaction():
        dead_letters.add(pg, [entry], max_payload_bytes=10)
        dead_letters.add(pg, [replace(entry, payload_raw=b"abcdefghijk")], max_payload_bytes=10)
    rows = pg.execute(
        "SELECT payload_raw, payload_sha256, payload FROM dead_letters ORDER BY id"
    ).fetchall()
    assert bytes(rows[0][0]) == b"0123456789"
    assert rows[0][2] == {"a": 1}
    assert not dead_letters.is_capped(bytes(rows[0][0]), bytes(rows[0][1]))
    assert bytes(rows[1][0]) == b"abcdefghij"
    assert bytes(rows[1][1]) == hashlib.sha256(b"abcdefghijk").digest()
    assert rows[1][2]["afterwrite_truncated"]["bytes"] == 11
    assert dead_letters.is_capped(bytes(rows[1][0]), bytes(rows[1][1]))


def test_list_prints_hostile_stored_text_as_text(
    env: None,
    settings: Settings,
    rdb: redis.Redis,
    pg: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("afterwrite.cli.main.console", Console(width=300))  # no wrapping
    key = wire.stream_key(settings.stream_prefix, "query")
    now = datetime.now(UTC)
    for field in ("[/oops]", "[link=https://evil.example]x[/link]", "\x1b[2J\x1b]8;;u\x07"):
        record = {"id": str(uuid.uuid4()), "created_at": now, "query": "q", field: 1}
        rdb.xadd(key, {wire.PAYLOAD_FIELD: wire.encode(record)})
    rt = Runtime(settings)
    try:
        assert rt.drain("query").run(budget_s=5).dead_lettered == 3
    finally:
        rt.close()
    out = _invoke("dlq", "list").output  # "[/oops]" raised rich's MarkupError
    assert "[/oops]" in out
    assert "[link=https://evil.example]" in out
    assert "\x1b" not in out
    assert "\x07" not in out
    assert "\\x1b[2J" in out  # shown, not sent
    for (dead_id,) in pg.execute("SELECT id FROM dead_letters").fetchall():
        assert "\x1b" not in _invoke("dlq", "show", str(dead_id)).output


def test_purge_asks_before_deleting(
    env: None, settings: Settings, rdb: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    _poison(rdb, settings)
    assert "3 dead letters match" in _invoke("dlq", "purge").output
    assert pg.execute("SELECT count(*) FROM dead_letters").fetchone() == (3,)
    assert "deleted 1" in _invoke("dlq", "purge", "--reason", "nul_byte", "--yes").output
    assert pg.execute("SELECT count(*) FROM dead_letters").fetchone() == (2,)


def test_bad_time_filter_is_refused(env: None, settings: Settings) -> None:
    result = CliRunner().invoke(main, ["dlq", "list", "--since", "last tuesday"])
    assert result.exit_code == 2
    assert "neither an ISO time" in result.output


def test_parse_time_forms() -> None:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    assert parse_time("2h", now=now) == datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    assert parse_time("1.5d", now=now) == datetime(2026, 11, 21, 0, 0, tzinfo=UTC)
    assert parse_time("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
