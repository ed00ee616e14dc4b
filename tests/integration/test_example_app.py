"""The example web apps, in process, against real Redis and PostgreSQL: what the handler
returns is what a drain stores, row for row."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
import redis.asyncio as aioredis
from psycopg.rows import dict_row

from afterwrite.core.settings import Settings, load_settings
from afterwrite.producer import AsyncClient, Client
from afterwrite.producer.client import redis_options
from afterwrite.worker.runtime import Runtime
from examples import fakellm
from examples.flask_app import create_app as create_flask_app
from examples.webapp import (
    LATENCY_METRIC,
    BackgroundRecording,
    Recording,
    SyncOrmRecording,
    create_app,
)

QUESTIONS: list[dict[str, Any]] = [
    {"query": "What is RAG?", "user_id": "u-1", "session_id": "s-1", "mode": "rag"},
    {"query": "Summarise this contract ✓", "user_id": "u-2", "mode": "chat"},
    {"query": "   Plain question   "},
]


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings)
    yield rt
    rt.close()


def _async_client(settings: Settings) -> AsyncClient:
    conn = aioredis.Redis.from_url(
        settings.require_redis_url(), **redis_options(settings, asyncio=True)
    )
    return AsyncClient(conn, settings)


def _rows(pg: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    cur = pg.cursor(row_factory=dict_row)
    return {str(r["id"]): r for r in cur.execute("SELECT * FROM query_history")}


def _check_stored(
    answers: list[dict[str, Any]],
    runtime: Runtime,
    pg: psycopg.Connection[Any],
    since: datetime,
) -> None:
    report = runtime.drain("query").run(budget_s=5)
    assert (report.entries, report.inserted, report.dead_lettered) == (len(answers),) * 2 + (0,)
    rows = _rows(pg)
    assert set(rows) == {a["event_id"] for a in answers}
    for question, answer in zip(QUESTIONS, answers, strict=True):
        assert answer["recorded"] == "sent"
        assert uuid.UUID(answer["event_id"]).version == 7
        expected = fakellm.complete(question["query"], question.get("mode"))
        assert answer["answer"] == expected.text
        row = rows[answer["event_id"]]
        assert row["query"] == question["query"]
        assert row["response"] == expected.text
        assert row["user_id"] == question.get("user_id")
        assert row["session_id"] == question.get("session_id")
        assert row["mode"] == question.get("mode")
        assert row["model_ids"] == [fakellm.MODEL]
        assert row["prompt_tokens"] == expected.prompt_tokens
        assert row["completion_tokens"] == expected.completion_tokens
        assert 0 <= row["response_time_ms"] < 5_000
        assert row["retrieval"] is None
        assert row["metadata"] is None
        assert since <= row["created_at"] <= datetime.now(UTC)
        assert row["ingested_at"] >= row["created_at"]


# --- FastAPI ----------------------------------------------------------------------------------


async def _post_all(client: AsyncClient, **app_options: Any) -> list[dict[str, Any]]:
    app = create_app(client, **app_options)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://example"
        ) as http,
    ):
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        answers = []
        for question in QUESTIONS:
            response = await http.post("/ask", json=question)
            assert response.status_code == 200, response.text
            answers.append(response.json())
        return answers


def test_fastapi_answers_are_stored_exactly(
    settings: Settings, runtime: Runtime, pg: psycopg.Connection[Any]
) -> None:
    since = datetime.now(UTC)

    async def scenario() -> list[dict[str, Any]]:
        client = _async_client(settings)
        try:
            return await _post_all(client, latency_ms=0)
        finally:
            await client.close()

    _check_stored(asyncio.run(scenario()), runtime, pg, since)


def test_fastapi_measures_the_simulated_latency(
    settings: Settings, runtime: Runtime, pg: psycopg.Connection[Any]
) -> None:
    async def scenario() -> list[dict[str, Any]]:
        async with _async_client(settings) as client:
            return await _post_all(client, latency_ms=5)

    answers = asyncio.run(scenario())
    runtime.drain("query").run(budget_s=5)
    rows = _rows(pg)
    assert all(rows[a["event_id"]]["response_time_ms"] >= 5 for a in answers)


def test_fastapi_client_from_env_is_opened_and_closed_by_the_lifespan(
    settings: Settings,
    runtime: Runtime,
    pg: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [k for k in os.environ if k.startswith("AFTERWRITE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AFTERWRITE_REDIS_URL", settings.require_redis_url())
    monkeypatch.setenv("AFTERWRITE_DATABASE_URL", settings.require_database_url())
    since = datetime.now(UTC)
    app = create_app()

    async def scenario() -> tuple[list[dict[str, Any]], AsyncClient]:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://example"
            ) as http,
        ):
            recorder = app.state.recorder
            assert isinstance(recorder, AsyncClient)
            answers = [(await http.post("/ask", json=q)).json() for q in QUESTIONS]
        return answers, recorder

    answers, recorder = asyncio.run(scenario())
    _check_stored(answers, runtime, pg, since)
    assert recorder.stats.snapshot()["sent"] == 2 * len(QUESTIONS)  # the query and its metric


def test_fastapi_rejects_a_request_without_a_query(settings: Settings) -> None:
    client = _async_client(settings)

    async def scenario() -> httpx.Response:
        async with (
            client,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_app(client)), base_url="http://example"
            ) as http,
        ):
            return await http.post("/ask", json={"user_id": "u-1"})

    assert asyncio.run(scenario()).status_code == 422
    assert sum(client.stats.snapshot().values()) == 0  # nothing was recorded


def test_fastapi_still_answers_when_redis_is_away(tmp_path: Path) -> None:
    # A port nothing listens on: the record is spilled to local disk at once (to be replayed
    # when Redis is back), and the user still gets the answer.
    settings = load_settings({}, redis_url="redis://127.0.0.1:1/0", spill_dir=tmp_path)

    async def scenario() -> dict[str, Any]:
        async with (
            _async_client(settings) as client,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_app(client)), base_url="http://example"
            ) as http,
        ):
            response = await http.post("/ask", json={"query": "Still there?"})
            assert response.status_code == 200
            body: dict[str, Any] = response.json()
            return body

    body = asyncio.run(scenario())
    assert body["recorded"] == "spilled"
    assert list(tmp_path.rglob("*"))  # the journal holds it
    assert body["answer"] == fakellm.complete("Still there?").text
    assert uuid.UUID(body["event_id"]).version == 7


async def _exercise(app: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Ask every question and add one document; the answers and the document's receipt."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://example"
        ) as http,
    ):
        answers = []
        for question in QUESTIONS:
            response = await http.post("/ask", json=question)
            assert response.status_code == 200, response.text
            answers.append(response.json())
        doc = await http.post(
            "/documents",
            json={"collection": "kb", "doc_id": "rag-101", "text": "RAG retrieves, then writes."},
        )
        assert doc.status_code == 200, doc.text
        bad = await http.post("/documents", json={"collection": "kb", "doc_id": "x", "text": " "})
        assert bad.status_code == 422
        return answers, doc.json()


def _check_all_kinds(
    answers: list[dict[str, Any]], doc: dict[str, Any], pg: psycopg.Connection[Any]
) -> None:
    """Query rows, one latency metric per answer and the embedding job are in PostgreSQL."""
    rows = _rows(pg)
    assert set(rows) == {a["event_id"] for a in answers}
    metrics = pg.execute(
        "SELECT count(*), min(value) FROM metric_points WHERE name = %s", (LATENCY_METRIC,)
    ).fetchone()
    assert metrics is not None
    assert metrics[0] == len(QUESTIONS)
    assert metrics[1] >= 0
    job = pg.execute(
        "SELECT collection, doc_id, op, text FROM embedding_jobs WHERE id = %s", (doc["event_id"],)
    ).fetchone()
    assert job == ("kb", "rag-101", "upsert", "RAG retrieves, then writes.")


def test_fastapi_handlers_record_queries_metrics_and_embedding_jobs(
    settings: Settings, runtime: Runtime, pg: psycopg.Connection[Any]
) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with _async_client(settings) as client:
            return await _exercise(create_app(client, latency_ms=0))

    answers, doc = asyncio.run(scenario())
    assert doc["recorded"] == "sent"
    for kind in ("query", "metric", "embed"):
        assert runtime.drain(kind).run(budget_s=5).dead_lettered == 0
    _check_all_kinds(answers, doc, pg)


def test_fastapi_background_recording_reaches_postgres(
    settings: Settings, runtime: Runtime, pg: psycopg.Connection[Any]
) -> None:
    conn = redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings))
    client = Client(conn, settings.model_copy(update={"producer_mode": "background"}))
    recording = BackgroundRecording(client)
    app = create_app(recording=recording, latency_ms=0)

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        try:
            return await _exercise(app)
        finally:
            await recording.close()  # flushes the buffer

    answers, doc = asyncio.run(scenario())
    assert {a["recorded"] for a in answers} == {"buffered"}
    assert client.stats.snapshot()["sent"] == 2 * len(QUESTIONS) + 1
    for kind in ("query", "metric", "embed"):
        runtime.drain(kind).run(budget_s=5)
    _check_all_kinds(answers, doc, pg)


def test_fastapi_sync_orm_recording_commits_in_the_request(
    settings: Settings, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    url = "postgresql+psycopg://" + settings.require_database_url().split("://", 1)[1]
    recording: Recording = SyncOrmRecording(url)
    app = create_app(recording=recording, latency_ms=0)

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        try:
            return await _exercise(app)
        finally:
            await recording.close()

    answers, doc = asyncio.run(scenario())
    assert {a["recorded"] for a in answers} == {"committed"}
    _check_all_kinds(answers, doc, pg)  # no drain: already committed
    assert rdb.keys(f"{settings.stream_prefix}:stream:*") == []


def test_fastapi_search_without_an_index_is_503_and_timings_count_posts(
    settings: Settings,
) -> None:
    async def scenario() -> tuple[int, int, dict[str, Any]]:
        async with _async_client(settings) as client:
            app = create_app(client, latency_ms=0, timing=True)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://example"
            ) as http:
                missing = await http.get("/search", params={"collection": "nothing", "q": "x"})
                bad_k = await http.get("/search", params={"collection": "c", "q": "x", "k": 0})
                for q in QUESTIONS:
                    await http.post("/ask", json=q)
                timings = (await http.get("/debug/timings", params={"reset": True})).json()
                after = (await http.get("/debug/timings")).json()
                assert after == {"count": 0}
                return missing.status_code, bad_k.status_code, timings

    missing, bad_k, timings = asyncio.run(scenario())
    assert missing == 503
    assert bad_k == 422
    assert timings["count"] == len(QUESTIONS)
    assert 0 < timings["p50_us"] <= timings["p99_us"] <= timings["max_us"]
    # the record_query call inside each /ask is timed on its own, and is part of the request
    assert 0 < timings["record_p50_us"] <= timings["record_p99_us"] <= timings["record_max_us"]
    assert timings["record_max_us"] < timings["max_us"]


def test_fastapi_search_returns_documents_and_filters(
    settings: Settings, pg: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from afterwrite.worker.index import jobs
    from benchmarks.index import set_documents
    from tests.index_helpers import add, random_unit

    x = random_unit(60, 384, seed=3)
    doc_ids = add(pg, "kb", x, model=settings.collection_model("kb"))
    langs = ["en", "de", "fr"]
    set_documents(
        pg,
        "kb",
        doc_ids,
        [f"document {i}" for i in range(60)],
        [{"lang": langs[i % 3]} for i in range(60)],
    )
    assert jobs.rebuild(settings, "kb")["status"] == "published"
    monkeypatch.setenv("AFTERWRITE_INDEX_DIR", str(settings.index_path))

    async def scenario() -> tuple[Any, Any, int, int]:
        async with _async_client(settings) as client:
            app = create_app(client, latency_ms=0)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://example"
            ) as http:
                q: dict[str, str | int] = {"collection": "kb", "q": "a document", "k": 30}
                plain = (await http.get("/search", params=q)).json()
                where = '{"lang": ["de", "fr"]}'
                filtered = (await http.get("/search", params={**q, "where": where})).json()
                empty = await http.get("/search", params={**q, "where": '{"lang": []}'})
                not_json = await http.get("/search", params={**q, "where": "lang=de"})
                return plain, filtered, empty.status_code, not_json.status_code

    plain, filtered, empty, not_json = asyncio.run(scenario())
    by_id = {d: i for i, d in enumerate(doc_ids)}
    assert len(plain["hits"]) == 30
    for hit in plain["hits"]:
        i = by_id[hit["doc_id"]]
        assert (hit["text"], hit["metadata"]) == (f"document {i}", {"lang": langs[i % 3]})
    assert len(filtered["hits"]) == 30
    assert {h["metadata"]["lang"] for h in filtered["hits"]} == {"de", "fr"}
    assert (empty, not_json) == (422, 422)


# --- Flask ------------------------------------------------------------------------------------


@pytest.fixture
def sync_client(settings: Settings) -> Iterator[Client]:
    conn = redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings))
    with Client(conn, settings) as client:
        yield client


def test_flask_answers_are_stored_exactly(
    sync_client: Client, runtime: Runtime, pg: psycopg.Connection[Any]
) -> None:
    since = datetime.now(UTC)
    http = create_flask_app(sync_client, latency_ms=0).test_client()
    assert http.get("/healthz").get_json() == {"status": "ok"}
    answers = []
    for question in QUESTIONS:
        response = http.post("/ask", json=question)
        assert response.status_code == 200, response.get_data(as_text=True)
        answers.append(response.get_json())
    _check_stored(answers, runtime, pg, since)


@pytest.mark.parametrize(
    "body",
    [{"user_id": "u-1"}, {"query": 42}, {"query": "q", "mode": ["rag"]}, ["What is RAG?"]],
)
def test_flask_rejects_malformed_requests(sync_client: Client, body: object) -> None:
    http = create_flask_app(sync_client).test_client()
    response = http.post("/ask", json=body)
    assert response.status_code == 400
    assert "error" in response.get_json()
    assert sum(sync_client.stats.snapshot().values()) == 0  # nothing was recorded
