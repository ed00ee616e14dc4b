"""A local HTTP server speaking the OpenAI embeddings protocol, for tests and the benchmark.

``POST /v1/embeddings`` with ``model``, ``input`` (a string, a list of strings, a token array or
a list of them), optional ``dimensions`` and ``encoding_format`` (``float`` or ``base64``)
returns OpenAI's response shape. Vectors are deterministic (seeded by a hash of the input and
the model) and unit length unless ``normalize=False``; ``floats_only=True`` answers float lists
whatever the ``encoding_format`` (as some compatible endpoints do). The server enforces OpenAI's
limits itself and answers 400 with OpenAI's error body when a request breaks them: at most
``max_inputs`` inputs, ``max_input_tokens`` per input and ``max_request_tokens`` per request,
counted as runs of letters/digits, single other characters and runs of spaces (never more
than the UTF-8 bytes, as with a byte-level BPE); empty strings are refused. A wrong Bearer key
is 401, an unknown model 404, ``dimensions`` on a model without it 400 (``param``).

Scripting: :meth:`FakeEmbeddingServer.fail_next` (N responses with a status, optionally a
``Retry-After``), :meth:`delay_next` (hold N responses, e.g. past the client's timeout),
:meth:`reject` (400 for any request containing that input), :meth:`drop_one_next` (a broken
endpoint: one embedding fewer than inputs). Every request is recorded in :attr:`requests`
(inputs, token counts, status, arrival time, requests in flight at arrival).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

DEFAULT_MODELS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
_SHORTENABLE = ("text-embedding-3",)
_PIECE = re.compile(r"\w+|\s+|[^\w\s]")


def fake_token_count(text: str) -> int:
    """Tokens as this server counts them: at most the UTF-8 length in bytes."""
    return len(_PIECE.findall(text))


@dataclass
class RecordedRequest:
    inputs: list[Any]
    token_counts: list[int]
    model: str
    dimensions: int | None
    encoding_format: str | None
    status: int
    arrived_s: float
    """``time.monotonic()`` at arrival."""
    in_flight: int
    """Requests being handled at arrival, this one included."""
    answered_s: float = 0.0


@dataclass
class _Fault:
    status: int = 0
    retry_after_s: float | None = None
    retry_after_ms: int | None = None
    delay_s: float = 0.0
    drop_one: bool = False


@dataclass
class _State:
    faults: list[_Fault] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    in_flight: int = 0


class FakeEmbeddingServer:
    """Start with :meth:`start` (or as a context manager); ``base_url`` ends in ``/v1``."""

    def __init__(
        self,
        *,
        api_key: str = "sk-test-fake",
        models: dict[str, int] | None = None,
        max_inputs: int = 2048,
        max_input_tokens: int = 8192,
        max_request_tokens: int = 300_000,
        normalize: bool = True,
        floats_only: bool = False,
        latency_s: float = 0.0,
    ) -> None:
        self.api_key = api_key
        self.models = dict(DEFAULT_MODELS if models is None else models)
        self.max_inputs = max_inputs
        self.max_input_tokens = max_input_tokens
        self.max_request_tokens = max_request_tokens
        self.normalize = normalize
        self.floats_only = floats_only
        self.latency_s = latency_s
        self._state = _State()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeEmbeddingServer:
        server = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> FakeEmbeddingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    # --- scripting and records -----------------------------------------------------------

    def fail_next(
        self,
        status: int,
        times: int = 1,
        *,
        retry_after_s: float | None = None,
        retry_after_ms: int | None = None,
        after: int = 0,
    ) -> None:
        """The ``times`` requests after the next ``after`` ones get ``status`` (queued behind
        faults scripted earlier)."""
        with self._lock:
            self._state.faults.extend(_Fault() for _ in range(after))
            self._state.faults.extend(
                _Fault(status, retry_after_s, retry_after_ms) for _ in range(times)
            )

    def delay_next(self, seconds: float, times: int = 1) -> None:
        """The next ``times`` requests are answered only after ``seconds``."""
        with self._lock:
            self._state.faults.extend(_Fault(delay_s=seconds) for _ in range(times))

    def drop_one_next(self, times: int = 1) -> None:
        """The next ``times`` responses carry one embedding fewer than their inputs."""
        with self._lock:
            self._state.faults.extend(_Fault(drop_one=True) for _ in range(times))

    def reject(self, text: str, message: str = "Invalid input: refused by policy") -> None:
        """Any request containing ``text`` as an input gets 400 with ``message``."""
        with self._lock:
            self._state.rejected[text] = message

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._state.requests)

    def clear(self) -> None:
        with self._lock:
            self._state.requests.clear()

    # --- protocol ------------------------------------------------------------------------

    def vector(self, item: str | list[int], model: str, dim: int) -> np.ndarray[Any, Any]:
        """The vector this server returns for ``item`` (for assertions)."""
        seed = hashlib.sha256(f"{model}\0{json.dumps(item)}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
        vec = rng.standard_normal(dim).astype(np.float32)
        if self.normalize:
            vec /= np.linalg.norm(vec)
        else:
            vec *= 3.0
        return vec

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], Any]:
        """One request: (status, extra headers, JSON body). Only well-formed requests (a JSON
        object with a non-empty ``input``) are recorded, and consume a scripted fault."""
        try:
            req = json.loads(body)
        except ValueError:
            return 400, {}, _error("We could not parse the JSON body of your request.")
        if not isinstance(req, dict):
            return 400, {}, _error("The body must be a JSON object.")
        model, raw = req.get("model"), req.get("input")
        dims_param, encoding = req.get("dimensions"), req.get("encoding_format")
        inputs = [raw] if isinstance(raw, str) or _is_tokens(raw) else raw
        if not isinstance(inputs, list) or not inputs:
            return 400, {}, _error("'input' must be a non-empty string or array", param="input")
        counts = [len(i) if _is_tokens(i) else fake_token_count(str(i)) for i in inputs]
        started = time.monotonic()
        with self._lock:
            self._state.in_flight += 1
            authorized = headers.get("authorization") == f"Bearer {self.api_key}"
            fault = _Fault(status=401)
            if authorized:
                fault = self._state.faults.pop(0) if self._state.faults else _Fault()
            record = RecordedRequest(
                inputs=inputs,
                token_counts=counts,
                model=str(model),
                dimensions=dims_param,
                encoding_format=encoding,
                status=0,
                arrived_s=started,
                in_flight=self._state.in_flight,
            )
            self._state.requests.append(record)
            rejected = dict(self._state.rejected)
        status = 500
        try:
            status, extra, payload = self._respond(
                model, inputs, counts, dims_param, encoding, fault, rejected
            )
            wait_s = max(fault.delay_s, self.latency_s)
            if wait_s:
                self._stopping.wait(wait_s)
        finally:
            with self._lock:
                self._state.in_flight -= 1
                record.status = status
                record.answered_s = time.monotonic()
        return status, extra, payload

    def _respond(
        self,
        model: Any,
        inputs: list[Any],
        counts: list[int],
        dims_param: Any,
        encoding: Any,
        fault: _Fault,
        rejected: dict[str, str],
    ) -> tuple[int, dict[str, str], Any]:
        if fault.status:
            extra: dict[str, str] = {}
            if fault.retry_after_s is not None:
                extra["retry-after"] = f"{fault.retry_after_s:g}"
            if fault.retry_after_ms is not None:
                extra["retry-after-ms"] = str(fault.retry_after_ms)
            if fault.status == 401:
                return 401, {}, _error("Incorrect API key provided.", "invalid_api_key")
            kind = "rate_limit_exceeded" if fault.status == 429 else "server_error"
            return fault.status, extra, _error(f"scripted {fault.status}", kind)
        dim_or_error = self._check_params(model, dims_param, encoding)
        if not isinstance(dim_or_error, int):
            return dim_or_error
        refusal = self._check_inputs(inputs, counts, rejected)
        if refusal is not None:
            return 400, {}, refusal
        data = []
        for index, item in enumerate(inputs):
            vec = self.vector(item, str(model), dim_or_error)
            emb: Any = vec.tolist()
            if encoding == "base64" and not self.floats_only:
                emb = base64.b64encode(vec.tobytes()).decode()
            data.append({"object": "embedding", "index": index, "embedding": emb})
        if fault.drop_one:
            data.pop()
        usage = {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}
        return 200, {}, {"object": "list", "data": data, "model": model, "usage": usage}

    def _check_params(
        self, model: Any, dims_param: Any, encoding: Any
    ) -> int | tuple[int, dict[str, str], Any]:
        """The output dimension, or the error response."""
        if model not in self.models:
            msg = f"The model `{model}` does not exist or you do not have access to it."
            return 404, {}, _error(msg, "model_not_found")
        dim = self.models[model]
        if dims_param is not None:
            if not str(model).startswith(_SHORTENABLE):
                msg = "This model does not support specifying dimensions."
                return 400, {}, _error(msg, param="dimensions")
            if not isinstance(dims_param, int) or not 1 <= dims_param <= dim:
                return 400, {}, _error(f"dimensions must be 1..{dim}", param="dimensions")
            dim = dims_param
        if encoding not in (None, "float", "base64"):
            msg = "encoding_format must be float or base64"
            return 400, {}, _error(msg, param="encoding_format")
        return dim

    def _check_inputs(
        self, inputs: list[Any], counts: list[int], rejected: dict[str, str]
    ) -> dict[str, Any] | None:
        """OpenAI's size limits and the scripted refusals: the 400 body, or None."""
        if len(inputs) > self.max_inputs:
            msg = f"'input' : maximum {self.max_inputs} inputs, got {len(inputs)}"
            return _error(msg, param="input")
        for item, count in zip(inputs, counts, strict=True):
            if item in ("", []):
                return _error("'input' cannot contain an empty string", param="input")
            if count > self.max_input_tokens:
                msg = (
                    f"This model's maximum context length is {self.max_input_tokens} tokens, "
                    f"however you requested {count} tokens in your input."
                )
                return _error(msg, param="input")
            if isinstance(item, str) and item in rejected:
                return _error(rejected[item], param="input")
        if sum(counts) > self.max_request_tokens:
            total = sum(counts)
            msg = f"Requested {total} tokens, max {self.max_request_tokens} tokens per request"
            return _error(msg, param="input", code="max_tokens_per_request")
        return None


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)


def _error(message: str, code: str | None = None, *, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error"
    if code == "rate_limit_exceeded":
        kind = "requests"
    elif code == "server_error":
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (timeout, closed pool) is normal here; others are printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_for(fake: FakeEmbeddingServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else headers and body wait on delayed ACKs: 40 ms

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/embeddings":
                self._send(404, {}, _error(f"Unknown path {self.path}"))
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            self._send(*fake.handle(headers, body))

        def _send(self, status: int, extra: dict[str, str], payload: Any) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (timeout): fine

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def running(**kwargs: Any) -> Iterator[FakeEmbeddingServer]:
    """A started server, stopped on exit."""
    server = FakeEmbeddingServer(**kwargs).start()
    try:
        yield server
    finally:
        server.stop()
