"""Per-process state of a worker: settings, connections and one drain per kind.

One explicit object instead of module globals. It is built on first use inside the process
that uses it and dropped in a forked child, so no socket is ever shared across a fork
(Celery's prefork pool forks after importing the app).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from afterwrite.core import wire
from afterwrite.core.backoff import compute_backoff_s
from afterwrite.core.settings import Settings, load_settings
from afterwrite.models.registry import kinds
from afterwrite.worker.embedding.stage import EmbedStage
from afterwrite.worker.ingest.database import Database
from afterwrite.worker.ingest.drain import KindDrain
from afterwrite.worker.ingest.streams import Stream
from afterwrite.worker.shutdown import Shutdown

log = logging.getLogger("afterwrite.runtime")


_instance: tuple[int, str] | None = None


def consumer_name() -> str:
    """This process's consumer name in every stream's group: ``host:instance:pid``.

    Host and pid alone are not unique: two containers of one image both run their worker as
    pid 1 or 7 under the same hostname, and shared one consumer (10,000 entries were
    processed twice). A random instance id, made once per process (again after a fork), is.
    The pid stays last, for operators and tests that look for the process holding a batch.
    """
    global _instance  # noqa: PLW0603  (one per process)
    pid = os.getpid()
    if _instance is None or _instance[0] != pid:
        _instance = (pid, secrets.token_hex(4))
    return f"{socket.gethostname()}:{_instance[1]}:{pid}"


def worker_redis(url: str) -> redis.Redis:
    # Generous timeouts: a worker may wait; a request handler may not (see
    # afterwrite.producer.client).
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)


@dataclass
class _Backoff:
    failures: int = 0
    until: float = 0.0


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = worker_redis(settings.require_redis_url())
        self.db = Database(
            settings.require_database_url(),
            statement_timeout_s=settings.batch_timeout_s,
            application_name=f"afterwrite-worker:{os.getpid()}",
        )
        self._drains: dict[str, KindDrain] = {}
        self._embed: EmbedStage | None = None
        self._backoffs: dict[str, _Backoff] = {}
        self.dispatched: dict[str, float] = {}
        """Task name → when this process's dispatcher last sent it (monotonic)."""
        self.first_builds: dict[str, float] = {}
        """Collection → when this process last asked for its first build (monotonic)."""
        self.shutdown = Shutdown()

    def drain(self, kind_name: str) -> KindDrain:
        drain = self._drains.get(kind_name)
        if drain is None:
            kind = kinds.get(kind_name)
            stream = Stream(
                self.redis,
                wire.stream_key(self.settings.stream_prefix, kind.name),
                self.settings.consumer_group,
                consumer_name(),
            )
            stream.ensure_group()
            drain = KindDrain(
                kind, stream, self.db, self.settings, stopping=lambda: self.shutdown.requested
            )
            self._drains[kind_name] = drain
        return drain

    def embed_stage(self) -> EmbedStage:
        if self._embed is None:
            self._embed = EmbedStage(
                self.settings,
                self.db.connection,
                self.redis,
                stopping=lambda: self.shutdown.requested,
            )
        return self._embed

    # A failing service (PostgreSQL or Redis down) is retried after a growing, jittered pause;
    # kicks arriving meanwhile return at once instead of hammering it. The embedding provider
    # has a backoff of its own (``which="embed"``): a provider outage must not pause drains.
    def backing_off(self, which: str = "store") -> float:
        return max(0.0, self._backoff_of(which).until - time.monotonic())

    def failed(self, which: str = "store") -> float:
        backoff = self._backoff_of(which)
        backoff.failures += 1
        # Never back off so long that another worker's reclaim takes over (and counts a
        # delivery of) the batch this worker is only waiting to retry.
        cap_s = min(30.0, self.settings.reclaim_idle_s / 2)
        delay = compute_backoff_s(backoff.failures, max_backoff_s=cap_s)
        backoff.until = time.monotonic() + delay
        return delay

    def stopped(self, which: str, pause_s: Callable[[int], float]) -> float:
        """Pause ``which`` after a configuration error: ``pause_s(failures in a row)``."""
        backoff = self._backoff_of(which)
        backoff.failures += 1
        delay = pause_s(backoff.failures)
        backoff.until = time.monotonic() + delay
        return delay

    def failures(self, which: str) -> int:
        """Failures of ``which`` in a row (0 after a success)."""
        return self._backoff_of(which).failures

    def succeeded(self, which: str = "store") -> None:
        self._backoffs[which] = _Backoff()

    def _backoff_of(self, which: str) -> _Backoff:
        return self._backoffs.setdefault(which, _Backoff())

    def hand_back_inflight(self) -> None:
        """Make every batch in flight reclaimable at once (called when abandoning it).

        Runs from a signal handler, possibly while this process's Redis connection is in the
        middle of a command, so it uses a connection of its own.
        """
        idle_ms = int(self.settings.reclaim_idle_s * 1000)
        conn = worker_redis(self.settings.require_redis_url())
        try:
            for drain in self._drains.values():
                s = drain.stream
                handed = Stream(conn, s.key, s.group, s.consumer).hand_back(idle_ms)
                log.warning(
                    "handed back %d pending entries of %s",
                    handed,
                    s.key,
                    extra={"action": "hand_back", "entries": handed},
                )
        finally:
            conn.close()

    def close(self) -> None:
        if self._embed is not None:
            self._embed.close()
        self.db.close()
        self.redis.close()


class RuntimeHolder:
    """Builds the Runtime lazily; forgets it in forked children."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._runtime: Runtime | None = None
        self._pid = os.getpid()
        self.pool_child = False
        """Set in Celery prefork children, where the runtime handles SIGTERM itself."""

    def get(self) -> Runtime:
        if self._runtime is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._runtime = Runtime(self._settings or load_settings())
            if self.pool_child:
                self._runtime.shutdown.install(self._runtime.hand_back_inflight)
        return self._runtime

    def request_shutdown(self) -> None:
        """Ask drains of this process to stop after their current batch (if any run here)."""
        if self._runtime is not None and self._pid == os.getpid():
            self._runtime.shutdown.request()

    def reset(self) -> None:
        if self._runtime is not None and self._pid == os.getpid():
            self._runtime.close()
        self._runtime = None
