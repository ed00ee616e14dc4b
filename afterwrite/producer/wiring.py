"""How a client finds its spill journal and, after a fork, its own Redis connections.

The spill journal: one directory per Redis target under ``spill_dir``.

Entries spilled for one Redis (host, port, database) and stream prefix are replayed only into
that same target, never into whatever Redis a later process happens to use: a spill directory
shared by a test run and a staging service, or a deploy that moved to another Redis, must not
mix their data. Segments for a target nobody uses any more stay on disk (and count against
``spill_max_bytes``, which covers the whole ``spill_dir``); they are logged once per process.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

from afterwrite.core.settings import Settings
from afterwrite.spill.journal import SUFFIX, SpillJournal

log = logging.getLogger("afterwrite.producer")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 96


def redis_target(connection_kwargs: Mapping[str, Any], prefix: str) -> str:
    """A directory name for (Redis server, database, stream prefix); no credentials in it."""
    db = connection_kwargs.get("db", 0)
    if connection_kwargs.get("path"):
        where = f"unix{connection_kwargs['path']}"
    else:
        host, port = connection_kwargs.get("host", "localhost"), connection_kwargs.get("port", 6379)
        where = f"{host}-{port}"
    name = _UNSAFE.sub("_", f"{where}-db{db}-{prefix}").strip("._") or "redis"
    if len(name) > _MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = f"{name[: _MAX_NAME - 13]}-{digest}"
    return name


def open_journal(settings: Settings, connection_kwargs: Mapping[str, Any]) -> SpillJournal | None:
    """The client's spill journal, or None when spilling is disabled (``spill_max_bytes=0``).
    Creates nothing on disk until the first spill."""
    if settings.spill_max_bytes == 0:
        return None
    root = settings.spill_path.absolute()
    directory = root / redis_target(connection_kwargs, settings.stream_prefix)
    _mention_other_targets(root, directory.name)
    return SpillJournal(
        directory,
        max_bytes=settings.spill_max_bytes,
        rescan_interval_s=settings.spill_replay_interval_s,
        shared_root=root,
    )


def has_segments(directory: Path) -> bool:
    try:
        return any(p.name.endswith(SUFFIX) for p in directory.iterdir())
    except OSError:
        return False


_mentioned: set[Path] = set()


def _mention_other_targets(root: Path, ours: str) -> None:
    try:
        others = [p for p in root.iterdir() if p.is_dir() and p.name != ours and has_segments(p)]
    except OSError:
        return
    for other in others:
        if other in _mentioned:  # once per process, not once per client
            continue
        _mentioned.add(other)
        log.warning(
            "spill directory %s holds entries for another Redis target (%s); they are replayed "
            "only by a client of that target",
            other,
            other.name,
            extra={"action": "spill_other_target"},
        )


# What a redis-py pool adds to its connection kwargs: state of that pool, not options.
_POOL_STATE_KEYS = frozenset({"himport_registry", "maint_notifications_pool_handler"})


def fresh_connection(conn: redis.Redis) -> redis.Redis:
    """A client with the same options on a new pool, for a forked child.

    Why not let redis-py re-initialise the inherited pool (it notices the new pid): redis-py 8
    does so under the pool's own lock, which a thread of the parent (our flusher) may have held
    at the fork; in the child that lock is never released, and the first command blocks
    forever. A new pool shares nothing with the parent's."""
    pool = conn.connection_pool
    kwargs = {
        k: v
        for k, v in pool.connection_kwargs.items()
        if k not in _POOL_STATE_KEYS and not k.startswith("orig_")
    }
    fresh = redis.ConnectionPool(
        connection_class=pool.connection_class, max_connections=pool.max_connections, **kwargs
    )
    return redis.Redis(connection_pool=fresh)
