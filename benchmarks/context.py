"""What every phase of ``afterwrite bench`` shares: where it runs and how it is isolated.

:func:`open_bench` gives the phases a :class:`Bench`: settings pointing at a dedicated database
(:data:`BENCH_DATABASE`, dropped, re-created and migrated each run), a dedicated stream prefix
(:data:`BENCH_STREAM_PREFIX`) and a dedicated Redis database as the bench processes' Celery
broker (:data:`BENCH_BROKER_DB`), plus the resets and the exactly-once check every phase uses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import redis
from rich.console import Console

from afterwrite import migrations
from afterwrite.core import wire
from afterwrite.core.settings import ENV_PREFIX, Settings
from afterwrite.demo.run import demo_endpoints
from afterwrite.demo.services import ensure_database
from afterwrite.models.registry import kinds
from benchmarks import celery_baseline as bench_baseline

BENCH_DATABASE = "afterwrite_bench"
BENCH_STREAM_PREFIX = "afterwrite-bench"
BENCH_BROKER_DB = int(os.environ.get("AFTERWRITE_BENCH_BROKER_DB", "1"))
"""Redis database (on the configured server) used as the Celery broker of the bench processes:
1 unless ``AFTERWRITE_BENCH_BROKER_DB`` says otherwise. Not 2–15, which test runs use (and
flush) for their own data."""
KIND = "query"
CONCURRENCY = 2


# Settings not handed to the bench worker: where things are is decided here, and secrets stay
# out of the child's environment.
_NOT_FORWARDED = frozenset(
    {
        "database_url",
        "redis_url",
        "broker_url",
        "stream_prefix",
        "flower_user",
        "flower_password",
        "metrics_user",
        "metrics_password",
    }
)


class BenchError(RuntimeError):
    """A phase could not complete (a process died, no progress, rows missing)."""


def broker_url_for(redis_url: str, db: int) -> str:
    """``redis_url`` pointing at database ``db`` (path for redis://, ``?db=`` for unix://)."""
    parts = urlsplit(redis_url)
    if parts.scheme == "unix":
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "db"] + [("db", str(db))]
        return urlunsplit(parts._replace(query=urlencode(query)))
    return urlunsplit(parts._replace(path=f"/{db}"))


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment for bench processes: ours without ``AFTERWRITE_*``, plus the settings that
    were set explicitly (tunables included, so the worker batches exactly as the ceiling does)
    and the bench's endpoints and stream prefix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    values = settings.model_dump()
    for name in sorted(settings.model_fields_set - _NOT_FORWARDED):
        value = values[name]
        if value is not None:
            env[ENV_PREFIX + name.upper()] = _env_value(value)
    env[ENV_PREFIX + "DATABASE_URL"] = settings.require_database_url()
    env[ENV_PREFIX + "REDIS_URL"] = settings.require_redis_url()
    env[ENV_PREFIX + "BROKER_URL"] = settings.celery_broker_url
    env[ENV_PREFIX + "STREAM_PREFIX"] = settings.stream_prefix
    return env


def _env_value(value: Any) -> str:
    """A setting's value as its ``AFTERWRITE_*`` variable spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass
class Bench:
    """The context every phase shares (built by :func:`open_bench`)."""

    settings: Settings
    """Bench settings: bench database, configured Redis, bench broker db and stream prefix."""
    admin_redis: redis.Redis
    broker_redis: redis.Redis
    console: Console
    log_dir: Path
    concurrency: int

    @property
    def stream(self) -> str:
        return wire.stream_key(self.settings.stream_prefix, KIND)

    @property
    def db_url(self) -> str:
        return self.settings.require_database_url()

    def reset_redis(self) -> None:
        """Delete every key under the bench prefix and the bench broker's Celery queues."""
        keys = list(self.admin_redis.scan_iter(match=f"{self.settings.stream_prefix}:*"))
        if keys:
            self.admin_redis.delete(*keys)
        stale = [
            "celery",
            bench_baseline.QUEUE,
            "unacked",
            "unacked_index",
            "unacked_mutex",
        ]
        self.broker_redis.delete(*stale)

    def reset_tables(self) -> None:
        """Empty the bench tables and checkpoint, so every phase starts from the same state."""
        table = kinds.get(KIND).table.name
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute(f'TRUNCATE "{table}", dead_letters')
            # A checkpoint now rather than in the middle of the next measurement; it needs
            # superuser or pg_checkpoint, and the figures stay valid without it.
            with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
                conn.execute("CHECKPOINT")

    def verify(self, ids: Sequence[str]) -> dict[str, Any]:
        """Did every record arrive exactly once? Compares stored ids with the ids sent."""
        table = kinds.get(KIND).table.name
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            stored = {str(r[0]) for r in conn.execute(f'SELECT id FROM "{table}"')}
            row = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
            dead = int(row[0]) if row else 0
        expected = set(ids)
        missing = len(expected - stored)
        unexpected = len(stored - expected)
        return {
            "rows": len(stored),
            "missing": missing,
            "unexpected": unexpected,
            "dead_letters": dead,
            "exactly_once": missing == 0 and unexpected == 0 and dead == 0,
        }


@contextlib.contextmanager
def open_bench(
    settings: Settings,
    console: Console,
    *,
    data_dir: Path | None,
    database: str,
    broker_db: int,
    concurrency: int,
) -> Iterator[Bench]:
    """The bench's own database (re-created and migrated), Redis connections and log directory
    on the demo endpoints; the bench's Redis keys and broker queues are cleared on entry and on
    exit."""
    data_dir = (data_dir or settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with demo_endpoints(settings, data_dir, console) as ep:
        # The endpoint's server, not its database: the bench gets a database of its own.
        db_url = ensure_database(ep.database_url, database, recreate=True)
        index_dir = data_dir / "bench-indexes" / database
        shutil.rmtree(index_dir, ignore_errors=True)
        bench_settings = settings.model_copy(
            update={
                "database_url": db_url,
                "redis_url": ep.redis_url,
                "broker_url": broker_url_for(ep.redis_url, broker_db),
                "stream_prefix": BENCH_STREAM_PREFIX,
                # Indexes of its own, like its database: never the demo's (OWNER.json).
                "index_dir": index_dir,
            }
        )
        migrations.upgrade(bench_settings.sqlalchemy_url())
        admin_redis = redis.Redis.from_url(ep.redis_url)
        broker_redis = redis.Redis.from_url(bench_settings.celery_broker_url)
        b = Bench(
            settings=bench_settings,
            admin_redis=admin_redis,
            broker_redis=broker_redis,
            console=console,
            log_dir=data_dir / "bench-logs",
            concurrency=concurrency,
        )
        b.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            b.reset_redis()
            yield b
        finally:
            b.reset_redis()
            admin_redis.close()
            broker_redis.close()
