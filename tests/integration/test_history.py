"""History (afterwrite.History, afterwrite.AsyncHistory) against real PostgreSQL and Redis:
records go through the client and the real drain, then are read back."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import psycopg
import pytest
import redis
from click.testing import CliRunner

from afterwrite import AsyncHistory, History, InvalidCursor
from afterwrite.cli.history import history_cmd
from afterwrite.core import wire
from afterwrite.core.settings import Settings
from afterwrite.history import StoredQuery
from afterwrite.history.records import COLUMNS
from afterwrite.models.base import writable_columns
from afterwrite.models.registry import kinds
from afterwrite.producer import Client
from afterwrite.worker.ingest.drain import DrainReport
from afterwrite.worker.runtime import Runtime

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def history(settings: Settings) -> Iterator[History]:
    with History.from_env(settings) as h:
        yield h


def store(settings: Settings, calls: Sequence[dict[str, Any]]) -> list[str]:
    """``record_query(**call)`` for each call, then drain until every row is stored; the ids."""
    with Client.from_env(settings) as client:
        ids = [str(client.record_query(**call)) for call in calls]
    rt = Runtime(settings)
    try:
        stored = 0
        while stored < len(ids):
            report = rt.drain("query").run(budget_s=10)
            assert report.dead_lettered == 0
            assert report.entries, "the stream ran dry before every record was stored"
            stored += report.inserted
    finally:
        rt.close()
    return ids


def embed_entries(rdb: redis.Redis, settings: Settings) -> list[bytes]:
    """The payloads on the embed stream, oldest first."""
    key = wire.stream_key(settings.stream_prefix, "embed")
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], rdb.xrange(key))
    return [fields[wire.PAYLOAD_FIELD] for _, fields in entries]


def drain_embed(settings: Settings) -> DrainReport:
    """One drain of the embed stream, as a worker runs it."""
    rt = Runtime(settings)
    try:
        return rt.drain("embed").run(budget_s=10)
    finally:
        rt.close()


def walk(history: History, **kwargs: Any) -> list[list[StoredQuery]]:
    pages = []
    cursor = None
    while True:
        page = history.recent(cursor=cursor, **kwargs)
        pages.append(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return pages


def test_a_record_reads_back_with_every_stored_field(settings: Settings, history: History) -> None:
    sent = {
        "query": "what is RAG?",
        "response": "Retrieval-augmented generation.",
        "user_id": "u1",
        "session_id": "s1",
        "mode": "rag",
        "model_ids": ["gpt-4o", "claude"],
        "response_time_ms": 812.5,
        "prompt_tokens": 120,
        "completion_tokens": 30,
        "retrieval": {"chunks": ["c1", "c2"], "top_k": 2},
        "metadata": {"tenant": "acme", "nested": [1, None, True]},
        "created_at": T0,
    }
    [event_id] = store(settings, [sent])
    got = history.get(event_id)
    assert got is not None
    assert set(COLUMNS) == {c.name for c in writable_columns(kinds.get("query").table)}
    assert got.id == event_id
    assert {k: getattr(got, k) for k in sent} == sent
    assert got.ingested_at > got.created_at
    assert got.as_dict()["created_at"] == T0.isoformat()
    assert history.get(str(uuid.uuid4())) is None  # unknown id
    assert history.get("not-an-id") is None  # cannot exist: no error, no query


def test_pagination_walks_a_users_whole_history_while_new_rows_arrive(
    settings: Settings, history: History
) -> None:
    # 3 records share each timestamp, so pages end in the middle of equal created_at values
    calls = [
        {"query": f"q{i}", "user_id": "walker", "created_at": T0 + timedelta(seconds=i // 3)}
        for i in range(100)
    ]
    calls += [{"query": "other", "user_id": "someone-else", "created_at": T0}] * 5
    before = set(store(settings, calls)[:100])
    seen: list[StoredQuery] = []
    cursor = None
    arrivals = 0
    while True:
        page = history.recent("walker", limit=7, cursor=cursor)
        seen += page.items
        # new records arrive between pages: newer ones, and one as old as the walk's oldest
        arrivals += 1
        store(
            settings,
            [
                {
                    "query": f"new{arrivals}",
                    "user_id": "walker",
                    "created_at": T0 + timedelta(hours=1),
                },
                {
                    "query": f"late{arrivals}",
                    "user_id": "walker",
                    "created_at": T0 - timedelta(days=1),
                },
            ],
        )
        cursor = page.next_cursor
        if cursor is None:
            break
    ids = [r.id for r in seen]
    assert len(ids) == len(set(ids)), "a row was repeated"
    assert before <= set(ids), "a row was missed"
    assert {r.user_id for r in seen} == {"walker"}
    keys = [(r.created_at, uuid.UUID(r.id)) for r in seen]
    assert keys == sorted(keys, reverse=True)  # newest first, one order across pages
    # rows newer than the walk's start stay above it; rows stored late with older timestamps
    # are found if the walk had not passed their place yet (the first ones, at least)
    assert not [r for r in seen if (r.query or "").startswith("new")]
    late = {r.query for r in seen if (r.query or "").startswith("late")}
    assert "late1" in late
    assert late <= {f"late{i}" for i in range(1, arrivals + 1)}


def test_recent_filters_combine(settings: Settings, history: History) -> None:
    base = {"user_id": "u", "created_at": T0}
    ids = store(
        settings,
        [
            {**base, "query": "a", "session_id": "s1", "mode": "chat", "model_ids": ["gpt-4o"]},
            {**base, "query": "b", "session_id": "s1", "mode": "rag", "model_ids": ["claude"]},
            {
                **base,
                "query": "c",
                "session_id": "s2",
                "mode": "rag",
                "model_ids": ["gpt-4o", "claude"],
            },
            {"query": "d", "user_id": "u", "created_at": T0 + timedelta(days=1)},
            {"query": "e", "user_id": "v", "created_at": T0, "mode": "rag"},
        ],
    )
    a, b, c, d, e = ids

    def found(**kw: Any) -> set[str]:
        return {r.id for page in walk(history, limit=2, **kw) for r in page}

    assert found(user_id="u") == {a, b, c, d}
    assert found() == set(ids)
    assert found(user_id="u", session_id="s1") == {a, b}
    assert found(session_id="s2") == {c}
    assert found(mode="rag") == {b, c, e}
    assert found(user_id="u", mode="rag") == {b, c}
    assert found(model="claude") == {b, c}
    assert found(model="gpt-4o", mode="rag") == {c}
    assert found(user_id="u", since=T0 + timedelta(hours=1)) == {d}
    assert found(user_id="u", until=T0 + timedelta(hours=1)) == {a, b, c}
    assert found(user_id="u", since=T0, until=T0 + timedelta(microseconds=1)) == {a, b, c}


def test_conversation_keeps_the_order_records_were_made_in(
    settings: Settings, history: History
) -> None:
    same_ms = T0 + timedelta(milliseconds=5)
    calls = [{"query": "hello", "session_id": "chat-1", "created_at": T0}]
    # five turns in the same millisecond (the same created_at): the call order must survive
    calls += [
        {"query": f"turn {i}", "session_id": "chat-1", "created_at": same_ms} for i in range(5)
    ]
    calls += [
        {"query": "bye", "session_id": "chat-1", "created_at": same_ms + timedelta(microseconds=1)}
    ]
    calls += [{"query": "elsewhere", "session_id": "chat-2", "created_at": same_ms}]
    ids = store(settings, calls)
    page = history.conversation("chat-1")
    assert [r.id for r in page.items] == ids[:7]
    assert [r.query for r in page.items] == ["hello", *(f"turn {i}" for i in range(5)), "bye"]
    assert page.next_cursor is None
    # the same order in pages of two, across the records of one millisecond
    walked: list[str] = []
    cursor = None
    while True:
        page = history.conversation("chat-1", limit=2, cursor=cursor)
        walked += [r.id for r in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert walked == ids[:7]
    assert history.conversation("no-such-session").items == []


def test_boundaries_empty_pages_unknown_user_and_foreign_cursors(
    settings: Settings, history: History
) -> None:
    store(settings, [{"query": f"q{i}", "user_id": "u", "created_at": T0} for i in range(4)])
    empty = history.recent("nobody")
    assert (empty.items, empty.next_cursor) == ([], None)
    # a last page that is exactly full says so: no empty page after it
    assert history.recent("u", limit=4).next_cursor is None
    first = history.recent("u", limit=3)
    assert len(first.items) == 3
    assert first.next_cursor is not None
    rest = history.recent("u", limit=3, cursor=first.next_cursor)
    assert len(rest.items) == 1
    assert rest.next_cursor is None

    with pytest.raises(InvalidCursor, match="another query"):
        history.recent("v", limit=3, cursor=first.next_cursor)
    with pytest.raises(InvalidCursor, match="another query"):
        history.recent("u", mode="chat", cursor=first.next_cursor)
    with pytest.raises(InvalidCursor, match="another query"):
        history.conversation("u", cursor=first.next_cursor)
    with pytest.raises(InvalidCursor, match="not a history cursor"):
        history.recent("u", cursor="garbage!")
    with pytest.raises(InvalidCursor, match="not a history cursor"):
        history.recent("u", cursor=first.next_cursor[:-4])
    assert isinstance(InvalidCursor("x"), ValueError)
    # a page size may change between pages: same query, same cursor
    assert len(history.recent("u", limit=1, cursor=first.next_cursor).items) == 1

    with pytest.raises(ValueError, match="limit"):
        history.recent("u", limit=0)
    with pytest.raises(ValueError, match="limit"):
        history.recent("u", limit=100_000)
    with pytest.raises(ValueError, match="timezone-aware"):
        history.recent("u", since=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="before until"):
        history.recent("u", since=T0, until=T0)


def test_last_page_after_rows_were_deleted_is_empty(
    settings: Settings, history: History, pg: psycopg.Connection[Any]
) -> None:
    store(
        settings,
        [
            {"query": f"q{i}", "user_id": "u", "created_at": T0 + timedelta(seconds=i)}
            for i in range(3)
        ],
    )
    first = history.recent("u", limit=2)
    assert first.next_cursor is not None
    pg.execute("DELETE FROM query_history WHERE created_at < %s", (T0 + timedelta(seconds=1),))
    last = history.recent("u", limit=2, cursor=first.next_cursor)
    assert (last.items, last.next_cursor) == ([], None)


def test_search_text_ranks_matching_questions(settings: Settings, history: History) -> None:
    ids = store(
        settings,
        [
            {"query": "How do I reset my password?", "response": "Use the link.", "user_id": "a"},
            {"query": "Password policy: passwords must be long", "user_id": "b"},
            {"query": "What is the refund policy?", "response": "Five days.", "user_id": "a"},
            {"query": "Reset the cache", "user_id": "a"},
            {"query": "hello", "response": "You can reset your password in settings."},
        ],
    )
    reset, policy, refund, cache, _ = ids
    hits = history.search_text("reset password")
    assert [h.record.id for h in hits] == [reset]  # answers are not searched, questions are
    # stemming: "passwords" and "password" are one word; ranked, the densest match first
    hits = history.search_text("passwords")
    assert [h.record.id for h in hits] == [policy, reset]
    assert hits[0].score > hits[1].score > 0
    assert {h.record.id for h in history.search_text("reset")} == {reset, cache}
    assert [h.record.id for h in history.search_text("reset", user_id="a", limit=1)] in (
        [reset],
        [cache],
    )
    assert {h.record.id for h in history.search_text("policy", user_id="a")} == {refund}
    assert history.search_text("policy", user_id="nobody") == []
    assert history.search_text("zebra") == []
    assert history.search_text("the") == []  # only a stop word: nothing to look for
    assert history.search_text("") == []
    assert {h.record.id for h in history.search_text('"refund policy" or "password policy"')} == {
        refund,
        policy,
    }


def test_search_responses_setting_indexes_answers_and_the_command_fills_older_rows(
    settings: Settings, history: History, cli_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = store(
        settings,
        [
            {"query": "hello", "response": "Reset your password in settings."},
            {"query": "private", "response": "Reset it.", "store_text": False},
        ],
    )
    assert history.search_text("settings") == []  # answers were not indexed then
    on = settings.model_copy(update={"search_responses": True})
    question, answer, bare = store(
        on,
        [
            {"query": "Which settings page?", "response": "The first one."},
            {"query": "where now", "response": "Open the settings page, then settings again."},
            {"query": "settings without an answer"},
        ],
    )
    hits = history.search_text("settings page")
    # a query's words rank above a response's, however often the response says them
    assert [h.record.id for h in hits] == [question, answer]
    assert {h.record.id for h in history.search_text("settings")} == {question, answer, bare}

    monkeypatch.setenv("AFTERWRITE_SEARCH_RESPONSES", "true")
    filled = CliRunner().invoke(history_cmd, ["index-responses", "--batch", "2"])
    assert filled.exit_code == 0, (filled.output, filled.exception)
    assert "indexed the responses of 1 row (walked 5)" in filled.output
    assert {h.record.id for h in history.search_text("settings")} == {
        before[0],
        question,
        answer,
        bare,
    }
    again = CliRunner().invoke(history_cmd, ["index-responses"])
    assert "indexed the responses of 0 rows" in again.output  # done work is skipped
    monkeypatch.delenv("AFTERWRITE_SEARCH_RESPONSES")
    off = CliRunner().invoke(history_cmd, ["index-responses"])
    assert off.exit_code == 0
    assert "AFTERWRITE_SEARCH_RESPONSES is off" in off.output


def test_async_history_reads_the_same(settings: Settings, history: History) -> None:
    calls = [
        {"query": f"q{i}", "user_id": "u", "session_id": "s", "created_at": T0} for i in range(5)
    ]
    ids = store(settings, calls)

    async def read() -> tuple[list[str], list[str], str | None, list[str]]:
        async with AsyncHistory.from_env(settings) as ah:
            walked: list[str] = []
            cursor = None
            while True:
                page = await ah.recent("u", limit=2, cursor=cursor)
                walked += [r.id for r in page.items]
                cursor = page.next_cursor
                if cursor is None:
                    break
            conv = [r.id for r in (await ah.conversation("s")).items]
            got = await ah.get(ids[0])
            texts = [h.record.id for h in await ah.search_text("q3")]
            return walked, conv, None if got is None else got.id, texts

    walked, conv, got, texts = asyncio.run(read())
    assert walked == [r.id for r in history.recent("u", limit=10).items] == ids[::-1]
    assert conv == ids
    assert got == ids[0]
    assert texts == [ids[3]]


def test_embed_queries_setting_makes_an_embedding_job_per_stored_query(
    settings: Settings, rdb: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    on = settings.model_copy(update={"embed_queries": True})
    question = {"query": "How do I reset my password?", "user_id": "u", "session_id": "s"}
    ids = store(on, [question, {"query": "   ", "user_id": "u"}])  # blank: nothing to embed
    jobs = [wire.decode(p) for p in embed_entries(rdb, settings)]
    assert [(j["id"], j["doc_id"], j["collection"], j["text"]) for j in jobs] == [
        (ids[0], ids[0], "queries", "How do I reset my password?")
    ]
    assert jobs[0]["metadata"] == {"user_id": "u", "session_id": "s"}
    report = drain_embed(settings)
    assert (report.entries, report.inserted, report.dead_lettered) == (1, 1, 0)
    rows = pg.execute("SELECT id::text, collection, doc_id, text FROM embedding_jobs").fetchall()
    assert rows == [(ids[0], "queries", ids[0], "How do I reset my password?")]


def test_record_query_embed_true_and_the_setting_make_one_job(
    settings: Settings, rdb: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    on = settings.model_copy(update={"embed_queries": True})
    [event_id] = store(on, [{"query": "Where is my invoice?", "user_id": "u", "embed": True}])
    payloads = embed_entries(rdb, settings)
    assert len(payloads) == 2  # the producer's and the drain's: the same job, byte for byte
    assert payloads[0] == payloads[1]
    report = drain_embed(settings)
    assert (report.entries, report.inserted, report.dead_lettered) == (2, 1, 0)
    rows = pg.execute("SELECT id::text, doc_id, metadata FROM embedding_jobs").fetchall()
    assert rows == [(event_id, event_id, {"user_id": "u"})]


def test_without_the_setting_no_job_is_made(settings: Settings, rdb: redis.Redis) -> None:
    store(settings, [{"query": "How do I reset my password?"}])
    assert rdb.xlen(wire.stream_key(settings.stream_prefix, "embed")) == 0


# --- the command ------------------------------------------------------------------------------
def test_cli_pages_a_users_history_and_a_conversation(
    settings: Settings, cli_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # no wrapping
    calls = [
        {
            "query": f"question {i}",
            "user_id": "u",
            "session_id": "s",
            "created_at": T0 + timedelta(minutes=i),
        }
        for i in range(3)
    ]
    calls.append({"query": "\x1b[31m[/boom]", "user_id": "u", "created_at": T0 - timedelta(days=3)})
    ids = store(settings, calls)
    first = CliRunner().invoke(history_cmd, ["--user", "u", "--limit", "2", "--json"])
    assert first.exit_code == 0, first.output
    page = json.loads(first.output)
    assert [r["id"] for r in page["items"]] == [ids[2], ids[1]]
    assert page["items"][0]["query"] == "question 2"
    rest = CliRunner().invoke(
        history_cmd, ["--user", "u", "--limit", "2", "--json", "--cursor", page["next_cursor"]]
    )
    assert [r["id"] for r in json.loads(rest.output)["items"]] == [ids[0], ids[3]]
    assert json.loads(rest.output)["next_cursor"] is None

    since = CliRunner().invoke(
        history_cmd, ["--user", "u", "--since", (T0 - timedelta(days=1)).isoformat(), "--json"]
    )
    assert [r["id"] for r in json.loads(since.output)["items"]] == ids[2::-1]
    conversation = CliRunner().invoke(history_cmd, ["--session", "s", "--json"])
    assert [r["id"] for r in json.loads(conversation.output)["items"]] == ids[:3]

    table = CliRunner().invoke(history_cmd, ["--user", "u"])
    assert table.exit_code == 0, (table.output, table.exception)
    assert "question 2" in table.output
    assert "\\x1b[31m[/boom]" in table.output  # stored text printed as text
    assert "\x1b" not in table.output

    foreign = CliRunner().invoke(history_cmd, ["--user", "v", "--cursor", page["next_cursor"]])
    assert foreign.exit_code == 2
    assert "another query" in foreign.output
    bad_time = CliRunner().invoke(history_cmd, ["--user", "u", "--since", "last tuesday"])
    assert bad_time.exit_code == 2


def test_cli_search(settings: Settings, cli_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    ids = store(
        settings,
        [
            {"query": "How do I reset my password?", "user_id": "a"},
            {
                "query": "Reset the billing cycle?",
                "response": "From the invoice page.",
                "user_id": "b",
            },
        ],
    )
    found = CliRunner().invoke(history_cmd, ["search", "reset", "--json"])
    assert found.exit_code == 0, found.output
    assert {h["id"] for h in json.loads(found.output)["hits"]} == set(ids)
    mine = CliRunner().invoke(history_cmd, ["search", "reset", "--user", "b", "--json"])
    assert [h["id"] for h in json.loads(mine.output)["hits"]] == [ids[1]]
    table = CliRunner().invoke(history_cmd, ["search", "password"])
    assert table.exit_code == 0, (table.output, table.exception)
    assert "How do I reset my password?" in table.output
    # an 80-column terminal gets a block per record, not a table squeezed past reading
    monkeypatch.setenv("COLUMNS", "80")
    narrow = CliRunner().invoke(history_cmd, ["search", "billing"])
    assert narrow.exit_code == 0, (narrow.output, narrow.exception)
    assert "  Q: Reset the billing cycle?\n  R: From the invoice page.\n" in narrow.output
    assert ids[1] in narrow.output
    assert "┃" not in narrow.output


# --- plans on a large table (slow: ~1 min) ----------------------------------------------------
PLAN_ROWS = 1_000_000
"""90 days of traffic ending at T0, 5,000 users (skewed), sessions of 8, four modes, four models
(the last in 1 % of rows); short texts, so the fill stays quick while every row has a search
vector."""

_FILL = """
INSERT INTO query_history (id, created_at, user_id, session_id, query, response, mode, model_ids,
                           response_search_vector)
SELECT gen_random_uuid(),
       %(end)s - (%(rows)s - g) * interval '7776 milliseconds',
       'user-' || floor(random() ^ 2 * 5000)::int,
       's-' || (g / 8),
       'question ' || (ARRAY['reset', 'deploy', 'debug', 'invoice'])[1 + g %% 4] || ' w' || g,
       'answer a' || (g %% 1000),
       CASE WHEN m < 0.60 THEN 'chat' WHEN m < 0.85 THEN 'rag' WHEN m < 0.96 THEN 'agent'
            ELSE 'compare' END,
       CASE WHEN r < 0.50 THEN '["gpt-4o"]'::jsonb WHEN r < 0.80 THEN '["claude-3-5-sonnet"]'
            WHEN r < 0.99 THEN '["llama-3.1-70b"]' ELSE '["command-r"]' END,
       -- responses indexed for the newer half (AFTERWRITE_SEARCH_RESPONSES turned on midway)
       CASE WHEN g > %(rows)s / 2 THEN to_tsvector('english', 'answer a' || (g %% 1000)) END
FROM (SELECT g, random() AS m, random() AS r FROM generate_series(1, %(rows)s) AS g) AS s
"""


def _plans(key: tuple[datetime, str]) -> dict[str, tuple[Any, set[str]]]:
    """name: (the plan of a history read, the indexes it may use)."""
    from afterwrite.history import cursor, queries

    none: dict[str, Any] = dict.fromkeys(
        ("user_id", "session_id", "mode", "model", "since", "until")
    )

    def recent(**kw: Any) -> Any:
        return queries.recent(**{**none, **kw}, limit=50, after=None)

    fp = cursor.fingerprint("recent", {**none, "user_id": "user-42"})
    deep = cursor.encode(fp, *key)
    by_user = {"ix_query_history_user_id_created_at"}
    by_time = {"ix_query_history_created_at"}
    return {
        "a user's newest page": (recent(user_id="user-42"), by_user),
        "a user's page deep in the walk": (
            queries.recent(**{**none, "user_id": "user-42"}, limit=50, after=deep),
            by_user,
        ),
        "a user's last week": (recent(user_id="user-4000", since=T0 - timedelta(days=7)), by_user),
        "a user's session": (
            recent(user_id="user-42", session_id="s-4242"),
            by_user | {"ix_query_history_session_id_created_at"},
        ),
        "everyone's newest page": (recent(), by_time),
        "one day": (recent(since=T0 - timedelta(days=1)), by_time),
        "a mode": (recent(mode="compare"), by_time | {"ix_query_history_mode_created_at"}),
        "a model in 1 % of rows": (
            recent(model="command-r"),
            by_time | {"ix_query_history_model_ids"},
        ),
        "a conversation": (
            queries.conversation("s-4242", limit=500, after=None),
            {"ix_query_history_session_id_created_at"},
        ),
        "one record": (queries.get(str(uuid.uuid4())), {"pk_query_history"}),
        "full text": (
            queries.search_text("w4242", user_id=None, limit=20),
            {"ix_query_history_search_vector"},
        ),
        "full text, a word of responses": (
            queries.search_text("a977", user_id=None, limit=20),
            {"ix_query_history_response_search_vector"},
        ),
        "full text, one user": (
            queries.search_text("invoice", user_id="user-42", limit=20),
            by_user | {"ix_query_history_search_vector"},
        ),
    }


def _scans(node: dict[str, Any]) -> list[tuple[str, str | None]]:
    found = []
    if "Relation Name" in node or "Index Name" in node:
        found.append((node["Node Type"], node.get("Index Name")))
    for child in node.get("Plans", []):
        found += _scans(child)
    return found


@pytest.mark.timeout(600)
def test_slow_every_history_read_uses_an_index_on_a_million_rows(
    pg: psycopg.Connection[Any],
) -> None:
    """SLOW (~1 min): fills query_history with PLAN_ROWS rows server-side."""
    pg.execute("SELECT setseed(0.42)")
    pg.execute(_FILL, {"end": T0, "rows": PLAN_ROWS})
    pg.execute("VACUUM ANALYZE query_history")
    key = pg.execute(
        "SELECT created_at, id::text FROM query_history WHERE user_id = 'user-42' "
        "ORDER BY created_at DESC, id DESC OFFSET 100 LIMIT 1"
    ).fetchone()
    assert key is not None
    for name, (plan, allowed) in _plans((key[0], key[1])).items():
        explain = pg.execute("EXPLAIN (FORMAT JSON) " + plan.sql, plan.params).fetchone()
        assert explain is not None
        scans = _scans(explain[0][0]["Plan"])
        assert not [s for s in scans if s[0] == "Seq Scan"], (name, scans)
        assert allowed & {s[1] for s in scans}, (name, scans)
        if name.startswith("full text") and "user" not in name:  # queries OR responses
            both = {"ix_query_history_search_vector", "ix_query_history_response_search_vector"}
            assert both <= {s[1] for s in scans}, (name, scans)
