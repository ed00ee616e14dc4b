"""FastAPI: answer a query, record it with afterwrite, return. Nothing touches PostgreSQL here.

Handlers record query history (``/ask``), a latency metric (``/ask``) and embedding jobs
(``/documents``) through afterwrite, and ``/search`` searches a collection's published index.
Run it (with ``AFTERWRITE_REDIS_URL`` set and a worker draining)::

    uvicorn examples.webapp:app --port 8000
    curl -s localhost:8000/ask -H 'content-type: application/json' -d '{"query": "What is RAG?"}'
    curl -s localhost:8000/documents -H 'content-type: application/json' \\
        -d '{"collection": "docs", "doc_id": "rag", "text": "RAG retrieves, then generates.",
             "metadata": {"lang": "en"}}'
    curl -s 'localhost:8000/search?collection=docs&q=retrieval'
    curl -s -G localhost:8000/search -d collection=docs -d q=retrieval \\
        --data-urlencode 'where={"lang": "en"}'
    curl -s -u "$AFTERWRITE_METRICS_USER:$AFTERWRITE_METRICS_PASSWORD" localhost:8000/metrics

``/metrics`` serves the producer's counters (records sent, spilled, dropped: what the
``AfterwriteProducerDropping`` alert watches) in the Prometheus text format, behind the same
HTTP basic credentials as ``afterwrite metrics-server``, the scrape login
(``AFTERWRITE_METRICS_USER`` / ``AFTERWRITE_METRICS_PASSWORD``, not Flower's; without them it
answers 503, ``AFTERWRITE_METRICS_UNAUTHENTICATED=true`` opens it for local development).

``EXAMPLE_RECORDING`` picks how handlers record (the load test, ``benchmarks.loadtest``,
compares them): ``direct`` (default: ``AsyncClient``, one XADD awaited per record),
``background`` (``Client`` in background mode: records go to an in-process buffer a flusher
thread sends) or ``sync-orm`` (what teams do without afterwrite: a SQLAlchemy session add and
commit per request, in a thread so the event loop keeps serving). ``EXAMPLE_TIMING=1`` times
every request inside the app and serves the figures at ``/debug/timings``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from afterwrite import AsyncClient, Client
from examples import fakellm

if TYPE_CHECKING:
    from afterwrite.core.settings import Settings

RECORDING_ENV = "EXAMPLE_RECORDING"
TIMING_ENV = "EXAMPLE_TIMING"
RECORD_TIMINGS_KEPT = 100_000
"""The newest recording-call durations each recording keeps (bounded: the app runs for days)."""
RECORDINGS = ("direct", "background", "sync-orm")
LATENCY_METRIC = "example.ask.latency_ms"
METRICS_AUTH = HTTPBasic(auto_error=False, realm="afterwrite")
"""``/metrics`` credentials (module level: FastAPI resolves the route's annotations here)."""


class Ask(BaseModel):
    query: str
    user_id: str | None = None
    session_id: str | None = None
    mode: str | None = None


class Answer(BaseModel):
    answer: str
    event_id: str
    recorded: str
    """``sent`` (Redis took it), ``buffered`` (background mode), ``spilled`` (on local disk,
    replayed when Redis is back), ``dropped`` or ``invalid``; ``committed`` (sync-orm)."""


class Document(BaseModel):
    collection: str
    doc_id: str
    text: str
    metadata: dict[str, Any] | None = None


class Recorded(BaseModel):
    event_id: str
    recorded: str


class Hit(BaseModel):
    doc_id: str
    score: float
    text: str | None
    metadata: dict[str, Any] | None


class SearchResult(BaseModel):
    collection: str
    version: int | None
    hits: list[Hit]


# --- how handlers record ----------------------------------------------------------------------
@dataclass(frozen=True)
class Query:
    text: str
    response: str
    user_id: str | None
    session_id: str | None
    mode: str | None
    model: str
    response_time_ms: float
    prompt_tokens: int
    completion_tokens: int


def _query_fields(q: Query) -> dict[str, Any]:
    """``record_query`` keyword arguments for ``q`` (every recording sends the same)."""
    return {
        "response": q.response,
        "user_id": q.user_id,
        "session_id": q.session_id,
        "mode": q.mode,
        "model_ids": [q.model],
        "response_time_ms": q.response_time_ms,
        "prompt_tokens": q.prompt_tokens,
        "completion_tokens": q.completion_tokens,
    }


class Recording(Protocol):
    """What the handlers call; each returns (event id, outcome). ``record_ns``: how long each
    ``query`` took to record, from building the record to the call returning (nanoseconds;
    the load test reads them through ``/debug/timings``)."""

    record_ns: deque[int]

    async def query(self, q: Query) -> tuple[str, str]: ...

    async def metric(self, name: str, value: float, tags: dict[str, str]) -> tuple[str, str]: ...

    async def embed(
        self, collection: str, doc_id: str, text: str, metadata: dict[str, Any] | None = None
    ) -> tuple[str, str]: ...

    async def close(self) -> None: ...


class DirectRecording:
    """``AsyncClient``: each record is one XADD (microseconds), awaited; never raises for Redis
    trouble (spilled to local disk instead)."""

    def __init__(self, client: AsyncClient, *, owned: bool) -> None:
        self.client = client
        self._owned = owned
        self.record_ns: deque[int] = deque(maxlen=RECORD_TIMINGS_KEPT)

    async def query(self, q: Query) -> tuple[str, str]:
        fields = _query_fields(q)
        started = time.perf_counter_ns()
        r = await self.client.record_query(q.text, **fields)
        self.record_ns.append(time.perf_counter_ns() - started)
        return str(r), r.outcome.value

    async def metric(self, name: str, value: float, tags: dict[str, str]) -> tuple[str, str]:
        r = await self.client.record_metric(name, value, tags=tags)
        return str(r), r.outcome.value

    async def embed(
        self, collection: str, doc_id: str, text: str, metadata: dict[str, Any] | None = None
    ) -> tuple[str, str]:
        r = await self.client.embed(collection, doc_id, text, metadata)
        return str(r), r.outcome.value

    async def close(self) -> None:
        if self._owned:
            await self.client.close()


class BackgroundRecording:
    """``Client`` in background mode: ``record_*`` appends to a bounded in-process buffer and
    returns; a flusher thread sends batches. Not awaited: nothing here does I/O."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.record_ns: deque[int] = deque(maxlen=RECORD_TIMINGS_KEPT)

    async def query(self, q: Query) -> tuple[str, str]:
        fields = _query_fields(q)
        started = time.perf_counter_ns()
        r = self.client.record_query(q.text, **fields)
        self.record_ns.append(time.perf_counter_ns() - started)
        return str(r), r.outcome.value

    async def metric(self, name: str, value: float, tags: dict[str, str]) -> tuple[str, str]:
        r = self.client.record_metric(name, value, tags=tags)
        return str(r), r.outcome.value

    async def embed(
        self, collection: str, doc_id: str, text: str, metadata: dict[str, Any] | None = None
    ) -> tuple[str, str]:
        r = self.client.embed(collection, doc_id, text, metadata)
        return str(r), r.outcome.value

    async def close(self) -> None:
        await run_in_threadpool(self.client.close)  # flushes the buffer


class SyncOrmRecording:
    """The pattern afterwrite replaces: an ORM insert and commit inside the request, in a
    worker thread (a blocking commit on the event loop would stall every other request)."""

    def __init__(self, database_url: str) -> None:
        from sqlalchemy import create_engine

        self.engine = create_engine(database_url, pool_size=16, max_overflow=16)
        self.record_ns: deque[int] = deque(maxlen=RECORD_TIMINGS_KEPT)

    def _commit(self, *rows: Any) -> None:
        from sqlalchemy.orm import Session

        with Session(self.engine) as session:
            session.add_all(rows)
            session.commit()

    async def query(self, q: Query) -> tuple[str, str]:
        from afterwrite.core.ids import uuid7_str
        from afterwrite.models.query_history import QueryHistory

        started = time.perf_counter_ns()
        event_id = uuid7_str()
        row = QueryHistory(
            id=event_id,
            created_at=datetime.now(UTC),
            query=q.text,
            response=q.response,
            user_id=q.user_id,
            session_id=q.session_id,
            mode=q.mode,
            model_ids=[q.model],
            response_time_ms=q.response_time_ms,
            prompt_tokens=q.prompt_tokens,
            completion_tokens=q.completion_tokens,
        )
        await run_in_threadpool(self._commit, row)
        self.record_ns.append(time.perf_counter_ns() - started)
        return event_id, "committed"

    async def metric(self, name: str, value: float, tags: dict[str, str]) -> tuple[str, str]:
        from afterwrite.core.ids import uuid7_str
        from afterwrite.models.metric import MetricPoint

        event_id = uuid7_str()
        point = MetricPoint(
            id=event_id, created_at=datetime.now(UTC), name=name, value=value, tags=tags
        )
        await run_in_threadpool(self._commit, point)
        return event_id, "committed"

    async def embed(
        self, collection: str, doc_id: str, text: str, metadata: dict[str, Any] | None = None
    ) -> tuple[str, str]:
        from afterwrite.core.collections import check_collection, check_doc_id
        from afterwrite.core.ids import uuid7_str
        from afterwrite.models.embedding import EmbeddingJob

        check_collection(collection)
        check_doc_id(doc_id)
        if not text.strip():
            raise ValueError("text must be a non-empty string")
        event_id = uuid7_str()
        job = EmbeddingJob(
            id=event_id,
            created_at=datetime.now(UTC),
            collection=collection,
            doc_id=doc_id,
            op="upsert",
            text=text,
            meta=metadata,
        )
        await run_in_threadpool(self._commit, job)
        return event_id, "committed"

    async def close(self) -> None:
        self.engine.dispose()


def recording_from_env(name: str | None = None) -> tuple[Recording, AsyncClient | Client | None]:
    """The recording ``EXAMPLE_RECORDING`` names, and the afterwrite client behind it."""
    from afterwrite.core.settings import load_settings

    name = name or os.environ.get(RECORDING_ENV, "direct")
    if name == "direct":
        aclient = AsyncClient.from_env()
        return DirectRecording(aclient, owned=True), aclient
    if name == "background":
        client = Client.from_env(load_settings(producer_mode="background"))
        return BackgroundRecording(client), client
    if name == "sync-orm":
        url = load_settings().require_database_url()
        return SyncOrmRecording("postgresql+psycopg://" + url.split("://", 1)[1]), None
    raise ValueError(f"{RECORDING_ENV} must be one of {', '.join(RECORDINGS)}, got {name!r}")


# --- timing -----------------------------------------------------------------------------------
class Timings:
    """Durations of the requests the app served, in nanoseconds (the load test reads them)."""

    def __init__(self) -> None:
        self.ns: list[int] = []

    def summary(self, record_ns: Sequence[int]) -> dict[str, float]:
        """Request quantiles, and ``record_*`` ones of the recording's ``record_ns``."""
        if not self.ns:
            return {"count": 0}
        out = {"count": len(self.ns), **_quantiles(self.ns, "")}
        if record_ns:
            out.update(_quantiles(record_ns, "record_"))
        return out


def _quantiles(ns: Sequence[int], prefix: str) -> dict[str, float]:
    data = sorted(ns)

    def q(p: float) -> float:
        return data[min(len(data) - 1, int(p * len(data)))] / 1000

    return {f"{prefix}p50_us": q(0.5), f"{prefix}p99_us": q(0.99), f"{prefix}max_us": q(1.0)}


ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


class TimingMiddleware:
    """Pure ASGI: from the request's arrival in the app to its last response byte, for POST
    requests (the recording handlers)."""

    def __init__(self, app: ASGIApp, timings: Timings) -> None:
        self.app = app
        self.timings = timings

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter_ns()
        try:
            await self.app(scope, receive, send)
        finally:
            self.timings.ns.append(time.perf_counter_ns() - started)


# --- the app ----------------------------------------------------------------------------------
def create_app(
    client: AsyncClient | None = None,
    *,
    latency_ms: float | None = None,
    recording: Recording | None = None,
    timing: bool | None = None,
    settings: Settings | None = None,
) -> FastAPI:
    """The app. ``client`` (direct recording) or ``recording`` are injected by tests; by
    default the recording ``EXAMPLE_RECORDING`` names is made at startup and closed at
    shutdown. ``settings`` holds the ``/metrics`` credentials (default: read from the
    environment on the first request to ``/metrics``)."""
    delay_s = (fakellm.latency_ms_from_env() if latency_ms is None else latency_ms) / 1000
    if recording is None and client is not None:
        recording = DirectRecording(client, owned=False)  # the caller owns it and closes it
    timings = Timings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if app.state.recording is not None:  # injected: the caller owns it
            yield
            return
        made, made_client = recording_from_env()
        app.state.recording, app.state.recorder = made, made_client
        try:
            yield
        finally:
            await made.close()
            for reader in app.state.readers.values():
                reader.close()

    app = FastAPI(title="afterwrite example", lifespan=lifespan)
    app.state.recorder = client
    app.state.recording = recording
    app.state.readers = {}
    app.state.timings = timings
    app.state.metrics_settings = settings
    _add_routes(app, delay_s)
    _add_metrics(app)
    if os.environ.get(TIMING_ENV) == "1" if timing is None else timing:
        _add_timing(app, timings)
    return app


def _add_routes(app: FastAPI, delay_s: float) -> None:
    @app.post("/ask")
    async def ask(body: Ask, request: Request) -> Answer:
        started = time.perf_counter()
        if delay_s:
            await asyncio.sleep(delay_s)
        completion = fakellm.complete(body.query, body.mode)
        rec: Recording = request.app.state.recording
        elapsed_ms = (time.perf_counter() - started) * 1000
        # Microseconds, never raises: if Redis is away the answer still goes out.
        event_id, outcome = await rec.query(
            Query(
                text=body.query,
                response=completion.text,
                user_id=body.user_id,
                session_id=body.session_id,
                mode=body.mode,
                model=completion.model,
                response_time_ms=elapsed_ms,
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
            )
        )
        await rec.metric(
            LATENCY_METRIC, elapsed_ms, {"model": completion.model, "mode": body.mode or "chat"}
        )
        return Answer(answer=completion.text, event_id=event_id, recorded=outcome)

    @app.post("/documents")
    async def add_document(body: Document, request: Request) -> Recorded:
        """Have a document embedded into ``collection``; searchable within seconds."""
        rec: Recording = request.app.state.recording
        try:
            event_id, outcome = await rec.embed(
                body.collection, body.doc_id, body.text, body.metadata
            )
        except ValueError as exc:  # a bad collection name, doc id or empty text
            raise HTTPException(422, str(exc)) from None
        return Recorded(event_id=event_id, recorded=outcome)

    @app.get("/search")
    async def search(
        collection: str, q: str, request: Request, k: int = 5, where: str | None = None
    ) -> SearchResult:
        """The ``k`` documents of ``collection`` nearest to ``q`` (its published index), with
        their text and metadata; ``where`` is a JSON metadata filter,
        ``{"lang": ["en", "de"]}``: the true top ``k`` among the documents it matches."""
        from afterwrite.readers.index_reader import IndexReader, IndexUnavailable

        readers: dict[str, IndexReader] = request.app.state.readers
        if not 1 <= k <= 100:
            raise HTTPException(422, "k must be between 1 and 100")
        try:
            conditions = None if where is None else json.loads(where)
        except ValueError as exc:
            raise HTTPException(422, f"where is not JSON: {exc}") from None
        try:
            reader = readers.get(collection)
            if reader is None:
                reader = await run_in_threadpool(IndexReader, collection)
                readers[collection] = reader
            # embedding the query and searching are CPU work: off the event loop
            hits = await run_in_threadpool(lambda: reader.search(q, k, where=conditions))
        except IndexUnavailable as exc:
            raise HTTPException(503, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return SearchResult(
            collection=collection,
            version=reader.version,
            hits=[
                Hit(doc_id=h.doc_id, score=h.score, text=h.text, metadata=h.metadata) for h in hits
            ],
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}


def _add_metrics(app: FastAPI) -> None:
    """``/metrics``: the producer's counters for Prometheus, behind HTTP basic authentication
    (the scrape login of ``afterwrite metrics-server``, ``AFTERWRITE_METRICS_USER`` /
    ``AFTERWRITE_METRICS_PASSWORD``)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    from afterwrite.producer.prometheus import ProducerCollector

    @app.get("/metrics")
    async def metrics(
        request: Request, credentials: Annotated[HTTPBasicCredentials | None, Depends(METRICS_AUTH)]
    ) -> Response:
        _check_metrics_credentials(request.app, credentials)
        registry = CollectorRegistry(auto_describe=False)
        recorder: AsyncClient | Client | None = request.app.state.recorder
        if recorder is not None:  # sync-orm records without afterwrite: nothing to export
            registry.register(ProducerCollector(recorder))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _check_metrics_credentials(app: FastAPI, given: HTTPBasicCredentials | None) -> None:
    from afterwrite.core.settings import load_settings

    settings: Settings | None = app.state.metrics_settings
    if settings is None:
        settings = app.state.metrics_settings = load_settings()
    if settings.metrics_unauthenticated:
        return
    if not (settings.metrics_user and settings.metrics_password):
        raise HTTPException(
            503,
            "/metrics needs credentials: set AFTERWRITE_METRICS_USER and "
            "AFTERWRITE_METRICS_PASSWORD (or AFTERWRITE_METRICS_UNAUTHENTICATED=true)",
        )
    expected = f"{settings.metrics_user}:{settings.metrics_password.get_secret_value()}".encode()
    supplied = b"" if given is None else f"{given.username}:{given.password}".encode()
    if not hmac.compare_digest(supplied, expected):
        raise HTTPException(
            401, "authentication required", headers={"WWW-Authenticate": 'Basic realm="afterwrite"'}
        )


def _add_timing(app: FastAPI, timings: Timings) -> None:
    @app.get("/debug/timings")
    async def get_timings(request: Request, reset: bool = False) -> dict[str, float]:
        record_ns: deque[int] = request.app.state.recording.record_ns
        out = timings.summary(record_ns)
        if reset:
            timings.ns.clear()
            record_ns.clear()
        return out

    app.add_middleware(TimingMiddleware, timings=timings)


app = create_app()
