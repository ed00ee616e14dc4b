"""Flask: the same ``/ask`` with the synchronous client.

Run it (with ``AFTERWRITE_REDIS_URL`` set and a worker draining)::

    flask --app examples.flask_app run --port 8000
    pip install gunicorn   # not in afterwrite's extras: your service's own server
    gunicorn 'examples.flask_app:create_app()'
"""

from __future__ import annotations

import atexit
import time
from typing import Any

from flask import Flask, jsonify, request

from afterwrite import Client
from examples import fakellm

OPTIONAL_FIELDS = ("user_id", "session_id", "mode")


def create_app(client: Client | None = None, *, latency_ms: float | None = None) -> Flask:
    """The app. ``client`` is injected by tests; by default one is made from ``AFTERWRITE_*``
    variables (a bad setting fails here, at start) and closed when the process exits."""
    delay_s = (fakellm.latency_ms_from_env() if latency_ms is None else latency_ms) / 1000
    if client is None:
        client = Client.from_env()
        atexit.register(client.close)
    recorder = client
    app = Flask(__name__)

    @app.post("/ask")
    def ask() -> Any:
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            return jsonify(error='expected a JSON object with a string "query"'), 400
        fields = {k: body.get(k) for k in OPTIONAL_FIELDS}
        if any(v is not None and not isinstance(v, str) for v in fields.values()):
            return jsonify(error=f"{', '.join(OPTIONAL_FIELDS)} must be strings"), 400
        started = time.perf_counter()
        if delay_s:
            time.sleep(delay_s)
        completion = fakellm.complete(body["query"], fields["mode"])
        # Microseconds, never raises: if Redis is away the answer still goes out.
        receipt = recorder.record_query(
            body["query"],
            response=completion.text,
            user_id=fields["user_id"],
            session_id=fields["session_id"],
            mode=fields["mode"],
            model_ids=[completion.model],
            response_time_ms=(time.perf_counter() - started) * 1000,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
        )
        return jsonify(
            answer=completion.text, event_id=str(receipt), recorded=receipt.outcome.value
        )

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify(status="ok")

    return app
