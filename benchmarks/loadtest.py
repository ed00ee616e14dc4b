"""Load test of the example web app over HTTP: where does recording cost the handler most?

For each recording of ``examples/webapp.py`` (``sync-orm``: an ORM insert and commit in the
request, what teams do today; ``direct``: afterwrite ``AsyncClient``; ``background``:
afterwrite ``Client`` in background mode) this starts the app under uvicorn in its own process,
drives ``POST /ask`` (one query record and one metric record per request) with ``wrk`` on
loopback for the same duration and connection count, and reports:

- handler latency p50/p99 as the app measures it (an ASGI middleware around the handler:
  request in → last response byte out, no client or kernel queueing), and the p50/p99 of the
  recording's own call (afterwrite: ``record_query``, awaited in direct mode; sync-orm: the
  row and its commit): what recording costs a request in a real server under load, between
  the parsing, the answer and the event loop's other work, not in a loop of nothing but calls,
- latency p50/p99 and requests/s as ``wrk`` sees them (closed loop: ``connections`` requests in
  flight at all times),
- that every request's records arrived: rows in PostgreSQL (sync-orm) or entries in the
  streams (afterwrite; no worker drains during the run, so the database's only load is the
  sync variant's).

``wrk`` (Debian package ``wrk``) is a real HTTP load generator written in C with an event loop,
so on two cores it costs far less CPU than the server it drives, unlike a Python client. When it
is missing and we are root, it is installed with ``apt-get install -y wrk`` (said on the
console).

Run it: ``python -m benchmarks.loadtest`` (its own database ``afterwrite_loadtest`` and
stream prefix on the configured servers; prints the table and the JSON).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import redis
from rich.console import Console
from rich.table import Table

from afterwrite.core import wire
from afterwrite.core.settings import Settings

# examples.webapp's switches (examples/ is not an installed package: run from a checkout)
RECORDING_ENV = "EXAMPLE_RECORDING"
TIMING_ENV = "EXAMPLE_TIMING"
RECORDINGS = ("sync-orm", "direct", "background")

LOADTEST_DATABASE = "afterwrite_loadtest"
LOADTEST_STREAM_PREFIX = "afterwrite_loadtest"
TARGET_P99_RATIO = 5.0
"""afterwrite direct's handler p99 is to be at least this many times lower than sync-orm's."""

BODY = {"query": "What is retrieval-augmented generation?", "user_id": "u-42", "mode": "rag"}
WRK_SCRIPT = f"""
wrk.method = "POST"
wrk.body = '{json.dumps(BODY)}'
wrk.headers["Content-Type"] = "application/json"
"""

_UNIT_US = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


class LoadTestError(RuntimeError):
    """The app did not start, wrk failed, or records went missing."""


def ensure_wrk(console: Console) -> str:
    """Path of ``wrk``; installs the Debian package when missing and running as root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise LoadTestError("wrk is not installed: apt-get install wrk (or your OS's package)")
    console.print("[yellow]wrk not found: installing it with apt-get install -y wrk[/]")
    cmd = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(cmd, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
        subprocess.run(cmd, capture_output=True, check=True)
    found = shutil.which("wrk")
    if not found:
        raise LoadTestError("apt-get install wrk did not provide a wrk binary")
    return found


def parse_wrk(output: str) -> dict[str, float]:
    """p50/p99 (µs), requests/s, requests and errors from ``wrk --latency`` output."""

    def latency(pct: str) -> float:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        if m is None:
            raise LoadTestError(f"no {pct}% line in wrk output:\n{output}")
        return float(m.group(1)) * _UNIT_US[m.group(2)]

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in", output, re.MULTILINE)
    if rps is None or total is None:
        raise LoadTestError(f"cannot read wrk output:\n{output}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    errors = int(non2xx.group(1)) if non2xx else 0
    if sock:
        errors += sum(int(g) for g in sock.groups())
    return {
        "p50_us": latency("50"),
        "p99_us": latency("99"),
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "errors": errors,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback URLs built here)
        return json.loads(response.read())


def _app_env(settings: Settings, recording: str, work_dir: Path) -> dict[str, str]:
    from benchmarks.context import worker_env

    env = worker_env(settings)
    env["AFTERWRITE_SPILL_DIR"] = str(work_dir / "spill")  # none expected; never the repo's
    env[RECORDING_ENV] = recording
    env[TIMING_ENV] = "1"
    env["FAKE_LLM_LATENCY_MS"] = "0"  # the handler's cost is the recording's
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # examples/ is not installed
    return env


def _start_app(
    settings: Settings, recording: str, work_dir: Path
) -> tuple[subprocess.Popen[bytes], int]:
    log = work_dir / f"app-{recording}.log"
    port = _free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "examples.webapp:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    out = log.open("wb")
    proc = subprocess.Popen(
        argv, env=_app_env(settings, recording, work_dir), stdout=out, stderr=out
    )
    out.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LoadTestError(f"the {recording} app exited:\n{log.read_text()[-3000:]}")
        try:
            if _get_json(f"http://127.0.0.1:{port}/healthz") == {"status": "ok"}:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise LoadTestError(f"the {recording} app did not answer within 60 s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()  # uvicorn shuts down; the background client flushes its buffer at exit
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wrk(wrk: str, script: Path, port: int, *, seconds: float, connections: int) -> str:
    argv = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",  # a slow answer is latency to report, not an error
        "--latency",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}/ask",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 90, check=False)
    if proc.returncode != 0:
        raise LoadTestError(f"wrk failed: {proc.stderr or proc.stdout}")
    return proc.stdout


def _stored(settings: Settings, recording: str) -> int:
    """Query records that arrived: rows (sync-orm) or stream entries (afterwrite)."""
    if recording == "sync-orm":
        with psycopg.connect(settings.require_database_url(), autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM query_history").fetchone()
        return int(row[0]) if row else 0
    r = redis.Redis.from_url(settings.require_redis_url())
    try:
        return int(r.xlen(wire.stream_key(settings.stream_prefix, "query")))
    finally:
        r.close()


def _reset(settings: Settings) -> None:
    r = redis.Redis.from_url(settings.require_redis_url())
    try:
        keys = list(r.scan_iter(match=f"{settings.stream_prefix}:*"))
        if keys:
            r.delete(*keys)
    finally:
        r.close()
    with psycopg.connect(settings.require_database_url(), autocommit=True) as conn:
        conn.execute("TRUNCATE query_history, metric_points, metric_rollups")


def run_variant(
    settings: Settings,
    recording: str,
    *,
    wrk: str,
    work_dir: Path,
    seconds: float,
    warmup_s: float,
    connections: int,
) -> dict[str, Any]:
    """One recording: start its app, warm up, measure, check every record arrived."""
    _reset(settings)
    script = work_dir / "ask.lua"
    script.write_text(WRK_SCRIPT)
    proc, port = _start_app(settings, recording, work_dir)
    try:
        if warmup_s > 0:
            _wrk(wrk, script, port, seconds=warmup_s, connections=connections)
        base = f"http://127.0.0.1:{port}/debug/timings"
        _get_json(base + "?reset=true")
        time.sleep(0.3)  # the warm-up's background records are sent within 20 ms
        before = _stored(settings, recording)
        client = parse_wrk(_wrk(wrk, script, port, seconds=seconds, connections=connections))
        inside = _get_json(base)
    finally:
        _stop(proc)
    arrived = _stored(settings, recording) - before
    if client["errors"]:
        raise LoadTestError(f"{recording}: {client['errors']:.0f} failed requests")
    if inside["count"] < client["requests"]:
        raise LoadTestError(f"{recording}: app timed {inside['count']} of {client['requests']}")
    if arrived < client["requests"]:
        raise LoadTestError(
            f"{recording}: {arrived} query records stored for {client['requests']:.0f} requests"
        )
    return {
        "recording": recording,
        "handler_p50_us": inside["p50_us"],
        "handler_p99_us": inside["p99_us"],
        "handler_max_us": inside["max_us"],
        "record_query_p50_us": inside.get("record_p50_us", 0.0),
        "record_query_p99_us": inside.get("record_p99_us", 0.0),
        "handled": inside["count"],
        "wrk_p50_us": client["p50_us"],
        "wrk_p99_us": client["p99_us"],
        "rps": client["rps"],
        "requests": int(client["requests"]),
        "records_arrived": arrived,
    }


def run_loadtest(
    settings: Settings,
    *,
    seconds: float = 10.0,
    warmup_s: float = 2.0,
    connections: int = 16,
    recordings: tuple[str, ...] = RECORDINGS,
    console: Console | None = None,
) -> dict[str, Any]:
    """Every recording in turn, same load; the table is printed on ``console``."""
    console = console or Console(stderr=True)
    wrk = ensure_wrk(console)
    results = []
    with tempfile.TemporaryDirectory(prefix="afterwrite-loadtest-") as tmp:
        for recording in recordings:
            console.print(f"load test: {recording} ({connections} connections, {seconds:g} s)")
            results.append(
                run_variant(
                    settings,
                    recording,
                    wrk=wrk,
                    work_dir=Path(tmp),
                    seconds=seconds,
                    warmup_s=warmup_s,
                    connections=connections,
                )
            )
    _reset(settings)
    by = {r["recording"]: r for r in results}
    out: dict[str, Any] = {
        "connections": connections,
        "seconds": seconds,
        "variants": results,
        "cpus": os.cpu_count(),
    }
    if "sync-orm" in by and "direct" in by:
        out["p99_ratio_direct"] = by["sync-orm"]["handler_p99_us"] / by["direct"]["handler_p99_us"]
        out["target_p99_ratio"] = TARGET_P99_RATIO
    if "sync-orm" in by and "background" in by:
        out["p99_ratio_background"] = (
            by["sync-orm"]["handler_p99_us"] / by["background"]["handler_p99_us"]
        )
    console.print(table(out))
    return out


def table(result: dict[str, Any]) -> Table:
    t = Table(title=f"POST /ask, {result['connections']} connections, {result['seconds']:g} s each")
    columns = ("recording", "record_query p50", "record_query p99", "handler p50", "handler p99")
    for col in (*columns, "wrk p50", "wrk p99", "requests/s"):
        t.add_column(col, justify="left" if col == "recording" else "right")
    for r in result["variants"]:
        t.add_row(
            r["recording"],
            f"{r['record_query_p50_us']:,.1f} µs",
            f"{r['record_query_p99_us']:,.1f} µs",
            f"{r['handler_p50_us']:,.0f} µs",
            f"{r['handler_p99_us']:,.0f} µs",
            f"{r['wrk_p50_us']:,.0f} µs",
            f"{r['wrk_p99_us']:,.0f} µs",
            f"{r['rps']:,.0f}",
        )
    return t


def main() -> None:
    """``python -m benchmarks.loadtest [seconds]``: own database and stream prefix."""
    from afterwrite import migrations
    from afterwrite.core.settings import load_settings
    from afterwrite.demo.services import ensure_database

    settings = load_settings()
    db_url = ensure_database(settings.require_database_url(), LOADTEST_DATABASE, recreate=True)
    settings = settings.model_copy(
        update={"database_url": db_url, "stream_prefix": LOADTEST_STREAM_PREFIX}
    )
    migrations.upgrade(settings.sqlalchemy_url())
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    result = run_loadtest(settings, seconds=seconds)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
