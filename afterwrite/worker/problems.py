"""Configuration problems a worker has stopped on, kept in Redis for ``health`` and ``status``.

A configuration error (a missing table, a refused password, a wrong provider key) cannot be
fixed by retrying, and a log line scrolls away. So the task that hit it records it in one Redis
hash, ``<prefix>:problems``, field ``<action>:<kind>``, and pauses for a growing while
(:func:`pause_s`). ``afterwrite health`` fails while the hash holds anything, ``afterwrite
status`` prints it, and every worker reads it before a reclaim: entries of a kind that cannot
be stored are not claimed, so waiting for a fix never counts deliveries against them.

The first successful run of the task removes its field; ``afterwrite migrate`` removes them all,
and a paused task sees that on its next kick and tries again at once.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

from afterwrite.core import logs

FIRST_PAUSE_S = 30.0
MAX_PAUSE_S = 300.0


def problems_key(prefix: str) -> str:
    return f"{prefix}:problems"


def task_id(action: str, kind: str) -> str:
    return f"{action}:{kind}"


def pause_s(failures: int) -> float:
    """How long a task waits after its ``failures``-th configuration error in a row:
    30 s, 60 s, 120 s, … up to five minutes."""
    return min(MAX_PAUSE_S, FIRST_PAUSE_S * 2.0 ** max(failures - 1, 0))


@dataclass(frozen=True)
class Problem:
    task: str
    """``action:kind``: ``drain:query``, ``embed:embed``, ``index_rebuild:*``."""
    error: str
    """Exception type and message, with secrets masked."""
    since: float
    """Unix time of the first failure in this run of failures."""
    last: float
    failures: int
    worker: str
    retry_in_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def report(
    conn: redis.Redis, prefix: str, task: str, exc: BaseException, worker: str, retry_in_s: float
) -> bool:
    """Record ``exc`` for ``task``. True when it is news (no problem, or another error, was on
    record), which is when the caller logs it loudly."""
    key = problems_key(prefix)
    error = logs.mask(f"{type(exc).__name__}: {exc}")
    now = time.time()
    before = _parse(task, conn.hget(key, task))
    news = before is None or before.error != error
    problem = Problem(
        task=task,
        error=error,
        since=now if before is None else before.since,
        last=now,
        failures=1 if before is None else before.failures + 1,
        worker=worker,
        retry_in_s=round(retry_in_s, 1),
    )
    conn.hset(key, task, json.dumps(problem.as_dict()))
    return news


def clear(conn: redis.Redis, prefix: str, task: str | None = None) -> int:
    """Forget ``task``'s problem (all of them when ``task`` is None); the number removed."""
    key = problems_key(prefix)
    if task is None:
        return int(conn.delete(key))
    return int(conn.hdel(key, task))


def is_reported(conn: redis.Redis, prefix: str, task: str) -> bool:
    return bool(conn.hexists(problems_key(prefix), task))


def read(conn: redis.Redis, prefix: str) -> list[Problem]:
    raw: dict[bytes, bytes] = conn.hgetall(problems_key(prefix))  # type: ignore[assignment]
    found = (_parse(k.decode(), v) for k, v in sorted(raw.items()))
    return [p for p in found if p is not None]


def blocks_kind(problems: list[Problem], kind: str) -> bool:
    """Whether a reported problem stops entries of ``kind`` from being stored."""
    return any(p.task.endswith(f":{kind}") for p in problems)


def _parse(task: str, raw: Any) -> Problem | None:
    if raw is None:
        return None
    try:
        fields = json.loads(raw)
        return Problem(**{**fields, "task": task})
    except (ValueError, TypeError):
        return Problem(task, str(raw)[:200], 0.0, 0.0, 1, "?", 0.0)
