"""FastAPI: answer a query, record it with afterwrite, return. Nothing touches PostgreSQL here.

Run it (with ``AFTERWRITE_REDIS_URL`` set and a worker draining)::

    uvicorn examples.webapp:app --port 8000
    curl -s localhost:8000/ask -H 'content-type: application/json' -d '{"query": "What is RAG?"}'
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from pydantic import BaseModel

from examples import fakellm
from producer import AsyncClient


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
    replayed when Redis is back), ``dropped`` or ``invalid``."""


def create_app(client: AsyncClient | None = None, *, latency_ms: float | None = None) -> FastAPI:
    """The app. ``client`` is injected by tests; by default one is made from ``AFTERWRITE_*``
    variables at startup and closed at shutdown."""
    delay_s = (fakellm.latency_ms_from_env() if latency_ms is None else latency_ms) / 1000

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if client is not None:  # injected: the caller owns it and closes it
            yield
            return
        async with AsyncClient.from_env() as recorder:  # closed at shutdown
            app.state.recorder = recorder
            yield

    app = FastAPI(title="afterwrite example", lifespan=lifespan)
    app.state.recorder = client

    @app.post("/ask")
    async def ask(body: Ask, request: Request) -> Answer:
        started = time.perf_counter()
        if delay_s:
            await asyncio.sleep(delay_s)
        completion = fakellm.complete(body.query, body.mode)
        recorder: AsyncClient = request.app.state.recorder
        # Microseconds, never raises: if Redis is away the answer still goes out.
        receipt = await recorder.record_query(
            body.query,
            response=completion.text,
            user_id=body.user_id,
            session_id=body.session_id,
            mode=body.mode,
            model_ids=[completion.model],
            response_time_ms=(time.perf_counter() - started) * 1000,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
        )
        return Answer(answer=completion.text, event_id=str(receipt), recorded=receipt.outcome.value)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


app = create_app()
