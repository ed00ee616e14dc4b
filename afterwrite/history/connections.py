"""PostgreSQL connections for history reads: a few kept open per process, sync and asyncio.

Reads run in autocommit mode (each one statement, its own snapshot). A connection that broke is
dropped, never returned for reuse; after ``fork`` a child opens its own. Failures are mapped to
afterwrite's meanings: the database away is :class:`HistoryUnavailable` (transient), a missing
table or column is :class:`HistorySchemaMissing` (run ``afterwrite migrate``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import psycopg.errors

from afterwrite.core.errors import SCHEMA_MISSING, ConfigurationError, TransientError

APPLICATION_NAME = "afterwrite-history"


class HistoryUnavailable(TransientError, ConnectionError):
    """PostgreSQL could not be reached or dropped the connection: try again later."""


class HistorySchemaMissing(ConfigurationError):
    """``query_history`` (or a column history reads) is missing: run ``afterwrite migrate``."""


@contextlib.contextmanager
def _mapped_errors() -> Iterator[None]:
    try:
        yield
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        raise HistorySchemaMissing(
            f"{SCHEMA_MISSING} ({str(exc).strip().splitlines()[0]})"
        ) from exc
    except psycopg.OperationalError as exc:
        raise HistoryUnavailable(f"PostgreSQL unavailable: {str(exc).strip()[:300]}") from exc


class Pool:
    """Thread-safe; at most ``max_idle`` connections stay open between reads."""

    def __init__(self, url: str, max_idle: int = 4) -> None:
        self._url = url
        self._max_idle = max_idle
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def fetch(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        with _mapped_errors(), self._connection() as conn:
            return conn.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._take()
        if conn is None:
            conn = psycopg.connect(self._url, autocommit=True, application_name=APPLICATION_NAME)
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        self._give(conn)

    def _take(self) -> psycopg.Connection[Any] | None:
        with self._lock:
            if self._pid != os.getpid():  # a fork child: the parent's sockets are not ours
                self._pid, self._idle = os.getpid(), []
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and not conn.broken:
                    return conn
        return None

    def _give(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            if len(self._idle) < self._max_idle and self._pid == os.getpid():
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class AsyncPool:
    """For one event loop at a time; at most ``max_idle`` connections stay open."""

    def __init__(self, url: str, max_idle: int = 4) -> None:
        self._url = url
        self._max_idle = max_idle
        self._idle: list[psycopg.AsyncConnection[Any]] = []

    async def fetch(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        with _mapped_errors():
            async with self._connection() as conn:
                cur = await conn.execute(sql, params)
                return await cur.fetchall()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        conn = None
        while self._idle and conn is None:
            candidate = self._idle.pop()
            if not candidate.closed and not candidate.broken:
                conn = candidate
        if conn is None:
            conn = await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, application_name=APPLICATION_NAME
            )
        try:
            yield conn
        except BaseException:
            await conn.close()
            raise
        if len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            await conn.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()
