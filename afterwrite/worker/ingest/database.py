"""The worker process's PostgreSQL connection: opened lazily (after fork), replaced when broken.

Each Celery worker process owns one connection; it is never shared across a fork, because it
is opened on first use inside the process that uses it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg

from afterwrite.worker.ingest.sql import KindSql


class Database:
    def __init__(self, url: str, *, statement_timeout_s: float, application_name: str) -> None:
        self._url = url
        self._options = (
            f"-c statement_timeout={int(statement_timeout_s * 1000)} "
            # A batch transaction left open by a hung worker must not hold locks forever.
            f"-c idle_in_transaction_session_timeout={int(statement_timeout_s * 2000)}"
        )
        self._application_name = application_name
        self._conn: psycopg.Connection[Any] | None = None
        self._staged: set[str] = set()

    def connection(self, kind_sql: KindSql | None = None) -> psycopg.Connection[Any]:
        """The live connection (opened if needed) with ``kind_sql``'s staging table ready."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self._url,
                options=self._options,
                application_name=self._application_name,
                connect_timeout=10,
            )
            self._staged.clear()
        if kind_sql is not None:
            key = kind_sql.copy.as_string(None)
            if key not in self._staged:
                with self._conn.transaction():
                    self._conn.execute(kind_sql.create_staging)
                self._staged.add(key)
        return self._conn

    def discard_if_broken(self) -> None:
        """After a failure: drop the connection if it is unusable, so the next use reconnects."""
        conn = self._conn
        if conn is None:
            return
        if conn.closed or conn.broken:
            self._conn = None
            return
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            try:
                conn.rollback()
            except psycopg.OperationalError:
                # The server went away mid-transaction, or a statement is still running (a
                # time limit interrupted it): close, so the session ends and its locks go
                # now rather than at a server timeout; reconnect next time.
                with contextlib.suppress(psycopg.Error):
                    conn.close()
                self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
