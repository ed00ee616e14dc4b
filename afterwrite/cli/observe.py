"""``afterwrite metrics-server`` and ``afterwrite health``, and the tables ``afterwrite status``
prints for freshness, embeddings and indexes.

The metrics server is an HTTP surface, so it asks for the scrape credentials by default
(HTTP basic, ``AFTERWRITE_METRICS_USER`` / ``AFTERWRITE_METRICS_PASSWORD``; Prometheus sends
them with ``basic_auth`` in its scrape config). They are not Flower's login: whoever can read
the scrape config must not be able to shut workers down. ``--unauthenticated`` or
``AFTERWRITE_METRICS_UNAUTHENTICATED`` turns that off for local development. It listens on
127.0.0.1 unless ``--host`` says otherwise.

Registered on the main group by afterwrite.cli.main.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import sys
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import click
from rich.table import Table

from afterwrite.cli.common import (
    cli_settings,
    fail,
    printable,
    safe,
)
from afterwrite.core.errors import SettingsError

if TYPE_CHECKING:
    from afterwrite.core.settings import Settings

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from afterwrite.worker.operations.status import Status

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1


# --- metrics-server ---------------------------------------------------------------------------
def basic_auth(app: WSGIApplication, user: str, password: str) -> WSGIApplication:
    """``app`` behind HTTP basic authentication (constant-time comparison)."""
    expected = f"{user}:{password}".encode()

    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        header = str(environ.get("HTTP_AUTHORIZATION", ""))
        scheme, _, token = header.partition(" ")
        given = b""
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(token.strip(), validate=True)
            except (binascii.Error, ValueError):
                given = b""
        if given and hmac.compare_digest(given, expected):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("WWW-Authenticate", 'Basic realm="afterwrite"'), ("Content-Type", "text/plain")],
        )
        return [b"authentication required\n"]

    return guarded


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape is noise; failures are logged by the collector


def metrics_app(settings: Any, *, authenticated: bool) -> WSGIApplication:
    from prometheus_client import make_wsgi_app

    from afterwrite.worker.operations.exporter import registry

    app: WSGIApplication = make_wsgi_app(registry(settings))
    if authenticated:
        assert settings.metrics_user
        assert settings.metrics_password
        app = basic_auth(app, settings.metrics_user, settings.metrics_password.get_secret_value())
    return app


def _service_settings() -> Settings:
    """Settings with both Redis and PostgreSQL configured, or exit 2 naming what is missing."""

    settings = cli_settings()
    try:
        settings.require_redis_url()
        settings.require_database_url()
    except SettingsError as exc:
        fail(str(exc))
    return settings


@click.command("metrics-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=9808, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--unauthenticated", is_flag=True, help="Serve without authentication (local development)."
)
def metrics_server(host: str, port: int, unauthenticated: bool) -> None:
    """Serve Prometheus metrics computed at scrape time from Redis and PostgreSQL.

    Needs AFTERWRITE_METRICS_USER and AFTERWRITE_METRICS_PASSWORD (HTTP basic; not Flower's
    login), unless --unauthenticated. Metric names: docs/monitoring.md.
    """

    settings = _service_settings()
    authenticated = not (unauthenticated or settings.metrics_unauthenticated)
    if authenticated and not (settings.metrics_user and settings.metrics_password):
        fail(
            "metrics-server needs credentials: set AFTERWRITE_METRICS_USER and "
            "AFTERWRITE_METRICS_PASSWORD (the scrape login, not Flower's), or pass "
            "--unauthenticated for local development"
        )
    app = metrics_app(settings, authenticated=authenticated)
    try:
        server = make_server(
            host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc}")
    click.echo(f"metrics on http://{host}:{server.server_port}/metrics", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# --- health -----------------------------------------------------------------------------------
@click.command("health")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--max-backlog-age-s",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Unhealthy when a stream's oldest entry is older than this.",
)
@click.option(
    "--timeout-s",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0.1, max=60),
    help="Timeout of each check.",
)
@click.option(
    "--no-worker", is_flag=True, help="Skip the worker ping (e.g. a web pod's readiness)."
)
def health(as_json: bool, max_backlog_age_s: float, timeout_s: float, no_worker: bool) -> None:
    """Check Redis, PostgreSQL, a live worker and backlog age; exit 0 when all pass.

    Exit codes: 0 healthy, 1 a check failed, 2 bad configuration.
    """
    from afterwrite.worker.operations.health import run_health

    settings = _service_settings()
    report = run_health(
        settings, max_backlog_age_s=max_backlog_age_s, timeout_s=timeout_s, worker=not no_worker
    )
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for c in report.checks:
            detail = printable(c.detail)
            click.echo(f"{'ok  ' if c.ok else 'FAIL'} {c.name:<9} {detail} ({c.duration_s:.3f}s)")
    sys.exit(EXIT_HEALTHY if report.ok else EXIT_UNHEALTHY)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def status_tables(report: Status) -> list[Table]:
    """The tables ``afterwrite status`` prints after streams, tables and dead letters."""
    fresh = Table(title="freshness (last hour)")
    for col in ("stage", "kind / collection", "samples", "50%", "90%", "99%", "max", "waiting"):
        fresh.add_column(col, justify="left" if col in {"stage", "kind / collection"} else "right")
    for d in report.freshness:
        waiting = "-" if d.stage != "embedded_to_searchable" else str(d.waiting)
        fresh.add_row(
            safe(d.stage),
            safe(d.scope),
            f"{d.samples:,}",
            _s(d.p50_s),
            _s(d.p90_s),
            _s(d.p99_s),
            _s(d.max_s),
            waiting,
        )
    out = [fresh]
    if report.embeddings is not None:
        e = report.embeddings
        emb = Table(title="embeddings")
        emb.add_column("figure")
        emb.add_column("value", justify="right")
        emb.add_row("backlog (jobs waiting + stream)", f"{e.backlog:,}")
        rate = "-" if e.cache_hit_rate is None else f"{e.cache_hit_rate:.1%}"
        emb.add_row("cache hit rate", rate)
        for name, value in e.counters.items():
            emb.add_row(safe(name), f"{value:,}")
        out.append(emb)
    idx = Table(title=f"indexes in {safe(report.index_dir)}" if report.index_dir else "indexes")
    if report.index_dir_problem:
        idx.caption = safe(report.index_dir_problem)
    for col in ("collection", "version", "vectors", "age", "last publish", "type", "model"):
        idx.add_column(col)
    for i in report.indexes:
        idx.add_row(
            safe(i.collection),
            "-" if i.version is None else str(i.version),
            "-" if i.vector_count is None else f"{i.vector_count:,}",
            "-" if i.age_s is None else f"{i.age_s:.0f}s",
            "-" if i.last_publish_age_s is None else f"{i.last_publish_age_s:.0f}s ago",
            safe(i.index_type or "-"),
            safe(i.model or "-"),
        )
    out.append(idx)
    return out


COMMANDS: tuple[Callable[..., Any], ...] = (metrics_server, health)
"""What afterwrite.cli.main registers: ``main.add_command(metrics_server)``,
``main.add_command(health)``."""
