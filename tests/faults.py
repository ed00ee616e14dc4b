"""Fault injection for the acceptance tests: a private service stack, a TCP proxy that can hold
or cut connections, a background producer, and small probes of PostgreSQL, Redis and logs.

Everything here talks to real processes; nothing is mocked. Probes open a fresh connection per
call, so they keep working across a restart of the server they query.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import redis
from psycopg import sql

from afterwrite.core import wire
from afterwrite.core.settings import Settings, load_settings
from afterwrite.demo import processes, traffic
from afterwrite.demo.services import PrivateServices
from afterwrite.models.registry import kinds
from afterwrite.producer import Client, Outcome
from afterwrite.producer.api import RecordMethods
from afterwrite.producer.client import redis_options
from afterwrite.producer.records import Receipt

QUERY_STREAM = "afterwrite:stream:query"
GROUP = "afterwrite"
WORKER_APP_PREFIX = "afterwrite-worker:"

FAST_SETTINGS: dict[str, str] = {
    # Small, quick batches and a fast reclaim, so crashes and outages play out in seconds.
    "batch_timeout_s": "1",
    "reclaim_idle_s": "2",
    "reclaim_interval_s": "1",
    "drain_budget_s": "2",
    "drain_interval_s": "0.5",
    "batch_max_entries": "1000",
}


# --- the private stack ----------------------------------------------------------------------


@dataclass
class Stack:
    """Private PostgreSQL and Redis (AOF) that a test may stop and start; same ports and data."""

    services: PrivateServices
    data_dir: Path
    database_url: str
    redis_url: str
    spill_dir: Path | None = None
    """The producers' spill journal for the current test (fresh per test, never the repo's)."""

    @property
    def redis_port(self) -> int:
        port = urlsplit(self.redis_url).port
        assert port is not None
        return port

    def env(self, **overrides: str) -> dict[str, str]:
        """Environment for worker and beat processes: fast settings, no developer variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERWRITE_")}
        values = {
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            # indexes and journals under the stack's directory, never the checkout's .afterwrite
            "data_dir": str(self.data_dir / "afterwrite-data"),
            **FAST_SETTINGS,
            **overrides,
        }
        env.update({f"AFTERWRITE_{k.upper()}": v for k, v in values.items()})
        return env

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "spill_dir": self.spill_dir or self.data_dir / "spill",
            "data_dir": self.data_dir / "afterwrite-data",
            **FAST_SETTINGS,
            **overrides,
        }
        return load_settings({}, **values)

    def ensure_running(self) -> None:
        """Start whatever a previous (failed) test left stopped; no-op when both run."""
        self.services.start_postgres()
        self.start_redis()

    def start_redis(self) -> None:
        """start_redis() returns once Redis has loaded its AOF (test_faults_redis_restart.py)."""
        self.services.start_redis()

    def clean(self) -> None:
        """Empty Redis and the tables; end sessions of workers a previous test left behind."""
        self.spill_dir = Path(tempfile.mkdtemp(prefix="spill-", dir=self.data_dir))
        r = redis.Redis.from_url(self.redis_url)
        with r:
            r.flushall()
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE %s",
                (WORKER_APP_PREFIX + "%",),
            )
            tables = [
                sql.Identifier(name)
                for name in (*(k.table.name for k in kinds), "dead_letters")
                if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() != (None,)
            ]
            conn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(tables)))

    def close(self) -> None:
        self.services.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


# --- processes ------------------------------------------------------------------------------


class Launcher:
    """Starts workers and beats for one test and stops every one of them at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._started: list[processes.Process] = []
        self._count = 0

    def worker(
        self, env: Mapping[str, str], *, loglevel: str = "INFO", concurrency: int = 2
    ) -> processes.Process:
        self._count += 1
        proc = processes.start_worker(
            env,
            self.log_dir,
            name=f"worker{self._count}",
            loglevel=loglevel,
            concurrency=concurrency,
        )
        self._started.append(proc)
        return proc

    def beat(self, env: Mapping[str, str]) -> processes.Process:
        proc = processes.start_beat(env, self.log_dir, loglevel="INFO")
        self._started.append(proc)
        return proc

    def stop_all(self) -> None:
        # Beat first (no new kicks), then the workers. Process.stop() signals the process's own
        # group (pool children included) and SIGKILLs it after the grace period.
        for proc in sorted(self._started, key=lambda p: p.name != "beat"):
            with contextlib.suppress(Exception):
                proc.stop(timeout_s=10)

    def tails(self) -> str:
        return "\n".join(
            f"===== {p.name} (pid {p.pid}) =====\n{p.tail(4000)}" for p in self._started
        )


# --- a TCP proxy ----------------------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to an upstream port, like a tiny toxiproxy. Threads.

    ``hold()`` stops forwarding (bytes already received wait in the proxy; ``upstream_only``
    holds only client → server, so replies still arrive), ``release()`` resumes. ``cut()``
    closes every open connection: peers see it closed mid-stream, held bytes are dropped.
    ``cut_after(n)`` forwards at most ``n`` more client → server bytes, then cuts.
    ``refuse(True)`` closes new connections at once (the server looks gone).
    """

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self._upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self.up_flowing = threading.Event()
        self.down_flowing = threading.Event()
        self.release()
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._closed = threading.Event()
        self._refusing = False
        self._budget: int | None = None
        self.connections = 0
        self.cuts = 0
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy", daemon=True)
        self._acceptor.start()

    def url(self, scheme: str = "redis", path: str = "/0") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def hold(self, *, upstream_only: bool = False) -> None:
        self.up_flowing.clear()
        if not upstream_only:
            self.down_flowing.clear()

    def release(self) -> None:
        self.up_flowing.set()
        self.down_flowing.set()

    def refuse(self, refusing: bool) -> None:
        self._refusing = refusing

    def cut_after(self, nbytes: int) -> None:
        with self._lock:
            self._budget = nbytes

    def cut(self) -> int:
        """Close every open connection; return how many."""
        with self._lock:
            links = list(self._links)
            self._links.clear()
            self._budget = None
            self.cuts += 1
        for link in links:
            link.close()
        return len(links)

    def close(self) -> None:
        self._closed.set()
        self._acceptor.join(timeout=5)
        self._listener.close()
        self.cut()
        self.release()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spend(self, data: bytes) -> tuple[bytes, bool]:
        """The part of ``data`` the cut_after budget lets through, and whether to cut then."""
        with self._lock:
            if self._budget is None:
                return data, False
            allowed = data[: self._budget]
            self._budget -= len(allowed)
            return allowed, self._budget == 0

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            link = _Link(self, client, upstream)
            with self._lock:
                self._links.add(link)
                self.connections += 1
            link.start()


class _Link:
    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket) -> None:
        self._proxy = proxy
        self._socks = (client, upstream)
        self._closed = threading.Event()
        self._once = threading.Lock()
        self._threads = [
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True),
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_upstream: bool) -> None:
        flowing = self._proxy.up_flowing if to_upstream else self._proxy.down_flowing
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                break
            while not flowing.wait(0.01):
                if self._closed.is_set():
                    return
            if self._closed.is_set():
                return
            cut = False
            if to_upstream:
                data, cut = self._proxy._spend(data)
            try:
                dst.sendall(data)
            except OSError:
                break
            if cut:
                self._proxy.cut()
                return
        self.close()

    def close(self) -> None:
        with self._once:
            if self._closed.is_set():
                return
            self._closed.set()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=2)
        for s in self._socks:
            s.close()


# --- producing ------------------------------------------------------------------------------


@dataclass
class BackgroundProducer:
    """Records ``count`` realistic query records from a thread, ``rate_per_s`` at most."""

    settings: Settings
    count: int
    seed: int = 7
    rate_per_s: float | None = None
    settle_spill_s: float = 0.0
    """After the last record, keep the client open up to this long until it has replayed
    everything it spilled (its pump replays the journal while Redis takes entries)."""
    receipts: list[Receipt] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    error: BaseException | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> BackgroundProducer:
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        conn = redis.Redis.from_url(
            self.settings.require_redis_url(), **redis_options(self.settings)
        )
        client = Client(conn, self.settings)
        started = time.monotonic()
        try:
            for i, kwargs in enumerate(traffic.queries(self.count, seed=self.seed)):
                if self._stop.is_set():
                    break
                self.receipts.append(client.record_query(**kwargs))
                if self.rate_per_s and i % 50 == 49:
                    ahead_s = (i + 1) / self.rate_per_s - (time.monotonic() - started)
                    if ahead_s > 0:
                        time.sleep(ahead_s)
            deadline = time.monotonic() + self.settle_spill_s
            while time.monotonic() < deadline and not self._settled(client):
                time.sleep(0.1)
        except BaseException as exc:  # reported by join(), not lost in the thread
            self.error = exc
        finally:
            self.stats = client.stats.snapshot()
            client.close()

    @staticmethod
    def _settled(client: Client) -> bool:
        snap = client.stats.snapshot()
        return snap["replayed"] >= snap["spilled"]

    def join(self, timeout_s: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"producer still running after {timeout_s}s"
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def sent(self) -> list[str]:
        """Ids Redis took during the call (Receipt.outcome SENT)."""
        return [str(r) for r in list(self.receipts) if r.outcome is Outcome.SENT]

    def accepted(self) -> list[str]:
        """Ids sent, buffered or spilled: the producer promised each will arrive."""
        return [str(r) for r in list(self.receipts) if r.accepted]

    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in list(self.receipts):
            counts[r.outcome.value] = counts.get(r.outcome.value, 0) + 1
        return counts


class _Payloads(RecordMethods[Any]):
    """Builds records exactly as the client does, without sending them."""

    def _record(self, kind: str, event_id: str, record: Any) -> Any:
        return record


def payloads(count: int, *, seed: int) -> list[bytes]:
    """``count`` realistic query records as stream payloads (what a client would XADD)."""
    build = _Payloads()
    return [wire.encode(build.record_query(**kw)) for kw in traffic.queries(count, seed=seed)]


def xadd_all(r: redis.Redis, entries: Iterable[bytes]) -> None:
    """Append raw payloads to the query stream in one round trip."""
    pipe = r.pipeline(transaction=False)
    for raw in entries:
        pipe.xadd(QUERY_STREAM, {wire.PAYLOAD_FIELD: raw})
    pipe.execute()


def record_all(settings: Settings, count: int, *, seed: int) -> list[str]:
    """Record ``count`` query records synchronously; every one must be SENT."""
    conn = redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings))
    ids = []
    with Client(conn, settings) as client:
        for kwargs in traffic.queries(count, seed=seed):
            receipt = client.record_query(**kwargs)
            assert receipt.outcome is Outcome.SENT, receipt.outcome
            ids.append(str(receipt))
    return ids


# --- probes ---------------------------------------------------------------------------------


def pg_rows(database_url: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(query, params).fetchall()


def pg_value(database_url: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    rows = pg_rows(database_url, query, params)
    return rows[0][0] if rows else None


def row_count(database_url: str) -> int:
    return int(pg_value(database_url, "SELECT count(*) FROM query_history"))


def stored_ids(database_url: str) -> list[str]:
    """Every stored id, one per row (so duplicates would show up twice)."""
    return [r[0] for r in pg_rows(database_url, "SELECT id::text FROM query_history")]


def dead_letter_count(database_url: str) -> int:
    return int(pg_value(database_url, "SELECT count(*) FROM dead_letters"))


@dataclass(frozen=True)
class Backend:
    pid: int
    application_name: str
    state: str | None
    in_transaction: bool
    query: str


def worker_backends(database_url: str) -> list[Backend]:
    rows = pg_rows(
        database_url,
        "SELECT pid, application_name, state, xact_start IS NOT NULL, query "
        "FROM pg_stat_activity WHERE application_name LIKE %s",
        (WORKER_APP_PREFIX + "%",),
    )
    return [Backend(int(r[0]), r[1], r[2], bool(r[3]), r[4] or "") for r in rows]


def writing(backend: Backend) -> bool:
    """The backend is inside a batch: a transaction whose COPY or INSERT is running or done."""
    q = backend.query.lstrip().upper()
    return backend.in_transaction and q.startswith(("COPY", "INSERT"))


def pending_ids(r: redis.Redis, *, consumer: str | None = None) -> list[str]:
    """Entry ids pending in the workers' group (optionally only ``consumer``'s)."""
    kwargs: dict[str, Any] = {"consumername": consumer} if consumer else {}
    rows: Any = r.xpending_range(QUERY_STREAM, GROUP, min="-", max="+", count=1_000_000, **kwargs)
    return [row["message_id"].decode() for row in rows]


def event_ids_of(r: redis.Redis, entry_ids: Iterable[str]) -> list[str]:
    """The record ids carried by stream entries (entries deleted meanwhile are skipped)."""
    pipe = r.pipeline(transaction=False)
    for eid in entry_ids:
        pipe.xrange(QUERY_STREAM, eid, eid)
    out = []
    for reply in pipe.execute():
        for _, fields in reply:
            out.append(str(wire.decode(fields[wire.PAYLOAD_FIELD])["id"]))
    return out


def stream_length(r: redis.Redis) -> int:
    return int(r.xlen(QUERY_STREAM))


def log_lines(path: Path, pattern: str) -> list[str]:
    if not path.exists():
        return []
    rx = re.compile(pattern)
    text = path.read_text(errors="replace")
    return [line for line in text.splitlines() if rx.search(line)]


@contextlib.contextmanager
def redis_conn(url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    try:
        yield conn
    finally:
        conn.close()


def assert_exactly_once(database_url: str, expected: Iterable[str]) -> None:
    """Every expected id is stored exactly once and nothing else is stored."""
    ids = stored_ids(database_url)
    want = sorted(set(expected))
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicate rows"
    missing = set(want) - set(ids)
    extra = set(ids) - set(want)
    assert not missing, f"{len(missing)} acknowledged ids missing, e.g. {sorted(missing)[:3]}"
    assert not extra, f"{len(extra)} unexpected ids stored, e.g. {sorted(extra)[:3]}"
    assert sorted(ids) == want
