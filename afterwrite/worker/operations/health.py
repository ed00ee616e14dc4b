"""Health checks for liveness and readiness probes (``afterwrite health``).

Four checks, each with a short timeout, run in order; a check whose prerequisite failed is
reported as failed without being tried (no worker ping through a Redis that is down):

- ``redis``: PING answered.
- ``postgres``: ``SELECT 1`` answered.
- ``worker``: at least one Celery worker answered a broadcast ``ping`` within the timeout.
  Celery's own remote-control ping, not a heartbeat key the worker would write: it needs no
  code in the worker, it is answered by the worker's main process (so a pool busy with long
  drains still answers, while a hung or stopped worker does not), and it goes through the
  very broker the worker consumes tasks from. ``limit=1`` returns on the first reply, so a
  healthy cluster answers in milliseconds.
- ``backlog``: the oldest entry of every stream is younger than ``max_backlog_age_s``.

Read-only; changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from afterwrite.core import logs
from afterwrite.core.errors import ConfigurationError
from afterwrite.core.settings import Settings

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_MAX_BACKLOG_AGE_S = 300.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    duration_s: float


@dataclass(frozen=True)
class HealthReport:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}


class Verdict(ConfigurationError):
    """Raised by a probe that reached its service and found the setup wanting (no schema):
    the message alone is the check's detail, with no exception type in front of it."""


def _timed(name: str, probe: Callable[[], str]) -> Check:
    """Run ``probe``: its return is the detail of a pass; any exception is a failure."""
    started = time.perf_counter()
    try:
        detail = probe()
    except Verdict as exc:
        return Check(name, False, logs.mask(str(exc)), time.perf_counter() - started)
    except Exception as exc:
        detail = logs.mask(f"{type(exc).__name__}: {exc}")
        return Check(name, False, detail, time.perf_counter() - started)
    return Check(name, True, detail, time.perf_counter() - started)


def _skipped(name: str, why: str) -> Check:
    return Check(name, False, f"not checked: {why}", 0.0)


def check_redis(settings: Settings, timeout_s: float) -> Check:
    import redis

    from afterwrite.worker.redis_memory import require_noeviction

    def probe() -> str:
        r = redis.Redis.from_url(
            settings.require_redis_url(), socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        try:
            r.ping()
            found = require_noeviction(r)
        finally:
            r.close()
        share = "" if found.used_share is None else f", {found.used_share:.0%} of maxmemory used"
        return f"PING answered (maxmemory-policy {found.policy}{share})"

    return _timed("redis", probe)


def _pg(settings: Settings, timeout_s: float) -> Any:
    """A connection whose connect and every statement give up after ``timeout_s``."""
    import psycopg

    return psycopg.connect(
        settings.require_database_url(),
        autocommit=True,
        connect_timeout=max(1, round(timeout_s)),
        options=f"-c statement_timeout={int(timeout_s * 1000)}",
    )


def check_postgres(settings: Settings, timeout_s: float) -> Check:
    def probe() -> str:
        with _pg(settings, timeout_s) as conn:
            conn.execute("SELECT 1")
        return "SELECT 1 answered"

    return _timed("postgres", probe)


def ping_workers(settings: Settings, timeout_s: float) -> list[str]:
    """Names of the Celery workers that answered a broadcast ping (at most one is waited for)."""
    from celery import Celery

    from afterwrite.worker.app import celery_config

    config = celery_config(settings)
    app = Celery("afterwrite-health", set_as_current=False)
    app.conf.update(
        broker_url=config["broker_url"],
        broker_use_ssl=config.get("broker_use_ssl"),
        accept_content=["json"],
        task_serializer="json",
        result_serializer="json",
        broker_connection_retry=False,
        broker_connection_retry_on_startup=False,
        broker_connection_max_retries=0,
        broker_connection_timeout=timeout_s,
        broker_transport_options={
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
        },
    )
    try:
        replies = app.control.ping(timeout=timeout_s, limit=1) or []
    finally:
        app.close()
    return sorted(name for reply in replies for name in reply)


def check_worker(settings: Settings, timeout_s: float) -> Check:
    def probe() -> str:
        names = ping_workers(settings, timeout_s)
        if not names:
            raise RuntimeError(f"no worker answered a ping within {timeout_s:g}s")
        return f"{names[0]} answered"

    return _timed("worker", probe)


def check_backlog(settings: Settings, max_age_s: float, timeout_s: float) -> Check:
    import redis

    from afterwrite.models.registry import kinds
    from afterwrite.worker.operations.status import stream_status

    def probe() -> str:
        r = redis.Redis.from_url(
            settings.require_redis_url(), socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        try:
            streams = [stream_status(r, settings, k.name) for k in kinds]
        finally:
            r.close()
        aged = [(s.oldest_age_s or 0.0, s.kind) for s in streams]
        age, kind = max(aged, default=(0.0, "-"))
        if age > max_age_s:
            raise RuntimeError(f"oldest entry of {kind!r} is {age:.1f}s old (limit {max_age_s:g}s)")
        return f"oldest entry {age:.1f}s old ({kind}); limit {max_age_s:g}s"

    return _timed("backlog", probe)


def check_schema(settings: Settings, timeout_s: float) -> Check:
    """afterwrite's tables are all there (else the one missing-schema line)."""
    from afterwrite.worker.operations.schema import SCHEMA_MISSING, missing_tables

    def probe() -> str:
        with _pg(settings, timeout_s) as conn:
            if missing_tables(conn):
                raise Verdict(SCHEMA_MISSING)
        return "afterwrite's tables are there"

    return _timed("schema", probe)


def check_problems(settings: Settings, timeout_s: float) -> Check:
    """Fails while a worker task is stopped by a configuration error (worker.problems)."""
    import redis

    from afterwrite.worker import problems

    def probe() -> str:
        r = redis.Redis.from_url(
            settings.require_redis_url(), socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        try:
            found = problems.read(r, settings.stream_prefix)
        finally:
            r.close()
        if found:
            raise RuntimeError("; ".join(f"{p.task} stopped: {p.error}" for p in found))
        return "no task stopped by a configuration error"

    return _timed("problems", probe)


def run_health(
    settings: Settings,
    *,
    max_backlog_age_s: float = DEFAULT_MAX_BACKLOG_AGE_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    worker: bool = True,
) -> HealthReport:
    """All checks (``worker=False`` leaves the worker ping out, e.g. for a web pod's probe)."""
    checks = [check_redis(settings, timeout_s), check_postgres(settings, timeout_s)]
    redis_ok = checks[0].ok
    if checks[1].ok:
        checks.append(check_schema(settings, timeout_s))
    if worker:
        if redis_ok:
            checks.append(check_worker(settings, timeout_s))
        else:
            checks.append(_skipped("worker", "Redis (the broker) is unreachable"))
    if redis_ok:
        checks.append(check_backlog(settings, max_backlog_age_s, timeout_s))
        checks.append(check_problems(settings, timeout_s))
    else:
        checks.append(_skipped("backlog", "Redis is unreachable"))
        checks.append(_skipped("problems", "Redis is unreachable"))
    return HealthReport(checks)
