"""The Celery app: ``celery -A afterwrite.worker.app worker|beat|flower``.

JSON only (a pickle-typed message is refused, never deserialized). Configuration is read from
``AFTERWRITE_*`` variables when Celery first needs it, so importing this module never fails;
starting a worker with bad settings does, naming the variable.

Tasks move batches, not events: beat sends one dispatcher task every ``drain_interval_s``,
which looks at every stream's length and the work flags in one round trip and sends only the
drains, embedding runs and index refreshes that have something to do (an idle pipeline runs
about one task a second, not five). A drain reads up to ``batch_max_entries`` stream entries
per batch and keeps going while there is backlog, within ``drain_budget_s``.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any
from urllib.parse import urlsplit

from celery import Celery, signals

from afterwrite.core import logs
from afterwrite.core.errors import SettingsError
from afterwrite.core.kinds import import_kind_modules
from afterwrite.core.settings import Settings, load_settings
from afterwrite.models.registry import kinds
from afterwrite.worker import shutdown
from afterwrite.worker.beat import NAME as BEAT_SCHEDULER
from afterwrite.worker.broker import NAME as BROKER_TRANSPORT
from afterwrite.worker.embedding.stage import embed_time_limit_s
from afterwrite.worker.ingest import privacy
from afterwrite.worker.operations.retention import retention_days
from afterwrite.worker.runtime import RuntimeHolder

DRAIN_TASK = "afterwrite.drain"
RECLAIM_TASK = "afterwrite.reclaim"
RETENTION_TASK = "afterwrite.retention"
EMBED_TASK = "afterwrite.embed"
INDEX_REBUILD_TASK = "afterwrite.index_rebuild"
INDEX_REFRESH_TASK = "afterwrite.index_refresh"
DISPATCH_TASK = "afterwrite.dispatch"


def check_kind_settings(settings: Settings) -> None:
    """Settings that name kinds must name registered ones (after AFTERWRITE_IMPORTS)."""
    unknown = sorted(set(settings.retention_days) - set(kinds.names()))
    if unknown:
        raise SettingsError(
            f"AFTERWRITE_RETENTION_DAYS names unknown kind(s) {', '.join(unknown)}; "
            f"registered: {', '.join(kinds.names())}"
        )
    for kind in kinds:
        if retention_days(kind, settings) is not None and "created_at" not in kind.table.c:
            raise SettingsError(
                f"AFTERWRITE_RETENTION_DAYS: kind {kind.name!r} has no created_at column"
            )
    privacy.check(settings)  # AFTERWRITE_REDACT names real fields; the hook imports


def _periodic(
    task: str, every_s: float, *, expires_s: float | None = None, args: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A beat entry. A kick nobody picked up within ``expires_s`` (default: one interval) is
    dropped: the next one does the same work."""
    entry: dict[str, Any] = {
        "task": task,
        "schedule": every_s,
        "options": {"expires": expires_s if expires_s is not None else every_s},
    }
    if args:
        entry["args"] = args
    return entry


def frequent_expiry_s(every_s: float) -> float:
    """Kicks every second or so may wait a few intervals (a busy pool) before they expire."""
    return max(5.0, 5 * every_s)


BEAT_LOCK_TIMEOUT_S = 30
"""A beat that stopped refreshing its lock this long ago is dead: another one takes over."""


def celery_config(settings: Settings) -> dict[str, Any]:
    s = settings
    schedule: dict[str, Any] = {}
    schedule["dispatch"] = _periodic(
        DISPATCH_TASK, s.drain_interval_s, expires_s=frequent_expiry_s(s.drain_interval_s)
    )
    for kind in kinds:
        name = (kind.name,)
        schedule[f"reclaim:{kind.name}"] = _periodic(RECLAIM_TASK, s.reclaim_interval_s, args=name)
    schedule["retention"] = _periodic(RETENTION_TASK, s.retention_interval_s)
    schedule["index_rebuild"] = _periodic(INDEX_REBUILD_TASK, s.index_rebuild_interval_s)
    embed_limit_s = embed_time_limit_s(settings)
    broker_is_redis = urlsplit(s.celery_broker_url).scheme in ("redis", "rediss", "unix")
    config: dict[str, Any] = {
        "broker_url": settings.celery_broker_url,
        "broker_connection_retry_on_startup": True,
        # Every afterwrite task is a kick that beat sends again (drain this, embed that), so a
        # message is taken once and never tracked: without ack emulation kombu keeps no
        # unacked hash to write on receipt and delete on ack. Those writes were refused by a
        # full Redis, and a worker whose ack failed stopped taking tasks for good (prefetch 1).
        "broker_transport_options": {"ack_emulation": False},
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": False,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.drain_budget_s + settings.batch_timeout_s * 2,
        "task_soft_time_limit": settings.drain_budget_s + settings.batch_timeout_s,
        "task_annotations": {
            # An embedding batch may wait out every retry of its provider requests.
            EMBED_TASK: {
                "soft_time_limit": embed_limit_s,
                "time_limit": embed_limit_s + settings.batch_timeout_s,
            }
        },
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
        "beat_schedule": schedule,
        # Beat keeps its state in Redis as JSON (celery-redbeat), not in a shelve file: Celery's
        # default scheduler unpickles that file, so whoever could write it (it sat in /tmp)
        # could run code as beat. RedBeat also holds a lock: a second beat waits and takes over
        # within redbeat_lock_timeout of the first one's death, instead of doubling every kick.
        "beat_scheduler": BEAT_SCHEDULER,
        "redbeat_redis_url": s.celery_broker_url if broker_is_redis else s.require_redis_url(),
        "redbeat_key_prefix": f"{s.stream_prefix}:beat",
        "redbeat_lock_timeout": BEAT_LOCK_TIMEOUT_S,
        # Said, not inherited: redbeat 2.4 warns at every beat start that it will stop falling
        # back to broker_transport_options (ack_emulation is the broker's, not its client's).
        "redbeat_redis_options": {},
        "beat_max_loop_interval": BEAT_LOCK_TIMEOUT_S / 5,
    }
    broker = urlsplit(settings.celery_broker_url)
    if broker.scheme in ("redis", "rediss"):
        # reconnect, not exit, when the broker's Redis is full or read-only (see broker.py)
        config["broker_transport"] = BROKER_TRANSPORT
        config["broker_connection_max_retries"] = None  # a full Redis may last: keep trying
    if broker.scheme == "rediss" and "ssl_cert_reqs" not in broker.query:
        # kombu refuses a rediss:// broker without TLS options; verify certificates by default
        # (a URL may still say ?ssl_cert_reqs=none for a self-signed development server).
        config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return config


class AfterwriteCelery(Celery):  # type: ignore[misc]
    def on_configure(self) -> None:
        # A method, not the on_configure signal: Celery logs and swallows exceptions of signal
        # receivers, and a worker with bad settings would then start on Celery's default
        # broker (amqp://localhost). Raised here, SettingsError stops it, naming the variable.
        settings = load_settings()
        import_kind_modules(settings.imports)  # before the schedule lists every kind
        check_kind_settings(settings)
        self.conf.update(celery_config(settings))


app = AfterwriteCelery("afterwrite", include=["afterwrite.worker.tasks"])
app.afterwrite = RuntimeHolder()  # the process-local Runtime, see afterwrite.worker.runtime


@signals.worker_process_init.connect
def _mark_pool_child(**_: Any) -> None:
    # A prefork child: SIGTERM (forwarded by the parent, or sent to the whole group) is to
    # finish the batch in flight, and a second one to abandon it. The handler is installed when
    # the child runs its first task (afterwrite.worker.tasks), because billiard replaces SIGTERM
    # handlers after this signal fires.
    app.afterwrite.pool_child = True


@signals.worker_init.connect
@signals.beat_init.connect
def _refuse_an_evicting_redis(**_: Any) -> None:
    # SystemExit, not an exception: Celery logs and swallows exceptions of signal receivers.
    import redis

    from afterwrite.worker.redis_memory import EvictingRedisError, require_noeviction

    settings = load_settings()
    urls = {settings.require_redis_url(), settings.celery_broker_url}
    for url in sorted(u for u in urls if u.startswith(("redis://", "rediss://", "unix://"))):
        try:
            with redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5) as conn:
                require_noeviction(conn)
        except EvictingRedisError as exc:
            logging.getLogger("afterwrite.worker").critical("%s", exc)
            raise SystemExit(f"afterwrite: {exc}") from None
        except (redis.RedisError, OSError):
            pass  # unreachable for now: Celery retries the connection and says so


@signals.worker_shutting_down.connect
def _stop_drains(**_: Any) -> None:
    # The main process is shutting down warm: drains in this process (solo/threads pools) and
    # in the pool's children stop after their current batch instead of using their budget.
    app.afterwrite.request_shutdown()
    shutdown.forward_to_children()


# Celery logs every task received and succeeded, and beat every kick it sends, at INFO: about
# 880 lines a minute from an idle pipeline, ~150 MB a day, hiding what happened. afterwrite
# logs at INFO what was done (a batch with rows, a dead letter, a build); failures stay
# visible (Celery logs them at ERROR); AFTERWRITE_LOG_LEVEL=DEBUG brings the rest back.
CHATTY_LOGGERS = ("celery.app.trace", "celery.worker.strategy", "celery.beat")


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _mask_secrets(logger: logging.Logger, **_: Any) -> None:
    # Celery's own handlers, in the main process and in pool children.
    settings = load_settings()
    logs.install(logger.handlers, json_format=settings.log_json)
    if settings.log_level != "DEBUG":
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
