"""``afterwrite demo``: the whole pipeline on realistic traffic, on whatever this machine has.

Services: the configured URLs if set; else PostgreSQL/Redis on their usual local ports; else
private instances under the data directory (stopped at the end). Then: migrate, start a Celery
worker and beat, record query history at full speed (or ``--rate``) with a live view of rows
persisted, ingest rate and lag, wait for the last row, print a summary; then embed a small
knowledge base with the offline model (or the configured provider), wait for beat to build its
FAISS index, search it with a few questions, and stop what it started.
"""

from __future__ import annotations

import contextlib
import os
import stat
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from afterwrite import migrations
from afterwrite.core import wire
from afterwrite.core.settings import Settings
from afterwrite.demo import corpus, processes, traffic
from afterwrite.demo.services import PrivateServices, ensure_database, local_endpoints
from afterwrite.producer import Client

DEMO_DATABASE = "afterwrite_demo"
DEMO_STREAM_PREFIX = "afterwrite-demo"
DEMO_COLLECTION = "kb"


@dataclass(frozen=True)
class DemoEndpoints:
    database_url: str
    redis_url: str
    where: str


@contextlib.contextmanager
def demo_endpoints(
    settings: Settings, data_dir: Path, console: Console, *, private: bool = False
) -> Iterator[DemoEndpoints]:
    """Configured URLs; else local servers (unless ``private``); else private ones, stopped
    when the context exits."""
    if settings.database_url and settings.redis_url:
        yield DemoEndpoints(settings.require_database_url(), settings.redis_url, "configured")
        return
    admin, local_redis = (None, None) if private else local_endpoints()
    db_url = settings.database_url and settings.require_database_url()
    redis_url = settings.redis_url or local_redis
    need_pg = db_url is None and admin is None
    services = None
    if need_pg or redis_url is None:
        data_dir = _reachable_by_postgres(data_dir)
        console.print(f"[dim]starting private services under {data_dir}[/dim]")
        services = PrivateServices(
            data_dir, postgres=need_pg, redis=redis_url is None, log=console.print
        )
        started = services.start()
        admin = admin if not need_pg else started.database_url
        redis_url = redis_url or started.redis_url
    try:
        if db_url is None:
            assert admin is not None
            db_url = ensure_database(admin, DEMO_DATABASE)
        assert redis_url is not None
        where = "private" if services is not None else "local"
        yield DemoEndpoints(db_url, redis_url, where)
    finally:
        if services is not None:
            services.stop()


def _reachable_by_postgres(data_dir: Path) -> Path:
    """As root, a private PostgreSQL runs as an unprivileged user, who must be able to reach
    its data directory; a project under a 0700 home (/root) is not. Fall back to /var/tmp."""
    if os.geteuid() != 0:
        return data_dir
    for parent in data_dir.resolve().parents:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            fallback = Path(tempfile.gettempdir()) / "afterwrite-demo"
            fallback.mkdir(mode=0o755, exist_ok=True)
            return fallback
    return data_dir


def _count_rows(conn: psycopg.Connection[Any], since: float) -> int:
    row = conn.execute(
        "SELECT count(*) FROM query_history WHERE ingested_at >= to_timestamp(%s)", (since,)
    ).fetchone()
    return int(row[0]) if row else 0


def run_demo(
    settings: Settings,
    *,
    records: int,
    rate: float,
    data_dir: Path | None,
    console: Console,
    private: bool = False,
    documents: int = 1000,
) -> int:
    data_dir = (data_dir or settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with demo_endpoints(settings, data_dir, console, private=private) as ep:
        console.print(f"PostgreSQL: {_safe(ep.database_url)}  Redis: {_safe(ep.redis_url)}")
        demo_settings = settings.model_copy(
            update={
                "database_url": ep.database_url,
                "redis_url": ep.redis_url,
                "stream_prefix": settings.stream_prefix
                if ep.where == "configured"
                else DEMO_STREAM_PREFIX,
                "index_dir": settings.index_dir or data_dir / "indexes",
            }
        )
        migrations.upgrade(demo_settings.sqlalchemy_url(), extra_dirs=settings.migration_dirs)
        console.print("schema migrated")
        env = dict(os.environ)  # the user's other settings (imports, tunables) apply too
        env.update(
            AFTERWRITE_DATABASE_URL=ep.database_url,
            AFTERWRITE_REDIS_URL=ep.redis_url,
            AFTERWRITE_STREAM_PREFIX=demo_settings.stream_prefix,
            AFTERWRITE_INDEX_DIR=str(demo_settings.index_path),
        )
        # the demo wants its index built soon after the documents are embedded
        env.setdefault("AFTERWRITE_INDEX_REBUILD_INTERVAL_S", "5")
        logs = data_dir / "logs"
        started = [processes.start_worker(env, logs), processes.start_beat(env, logs)]
        try:
            code = _traffic(demo_settings, records, rate, console, started)
            if code == 0 and documents > 0:
                code = _embeddings(demo_settings, documents, console, started)
            return code
        finally:
            for p in started:
                p.stop()
            console.print(f"worker and beat stopped (logs in {logs})")


def _traffic(
    settings: Settings,
    records: int,
    rate: float,
    console: Console,
    started: list[processes.Process],
) -> int:
    client = Client.from_env(settings)
    r = redis.Redis.from_url(settings.require_redis_url())
    stream = wire.stream_key(settings.stream_prefix, "query")
    if not _wait_for_worker(r, stream, started, console):
        console.print("[red]the worker did not start:[/red]")
        for p in started:
            console.print(p.tail())
        return 1
    t0 = time.time()
    latencies_us: list[float] = []
    failed = 0
    with (
        psycopg.connect(settings.require_database_url(), autocommit=True) as conn,
        progress_bar(console) as progress,
    ):
        sent_task = progress.add_task("recorded ", total=records, info="")
        rows_task = progress.add_task("persisted", total=records, info="")
        next_poll = 0.0
        for i, kwargs in enumerate(traffic.queries(records, seed=int(t0))):
            if rate > 0:
                time.sleep(max(0.0, t0 + i / rate - time.time()))
            start = time.perf_counter_ns()
            receipt = client.record_query(**kwargs)
            latencies_us.append((time.perf_counter_ns() - start) / 1000)
            failed += not receipt.accepted
            progress.advance(sent_task)
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + 0.5
                _update(progress, rows_task, conn, r, stream, t0)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = _update(progress, rows_task, conn, r, stream, t0)
            if done >= records - failed:
                break
            if _worker_exited(started, console):
                return 1
            time.sleep(0.25)
        elapsed = time.time() - t0
        persisted = _count_rows(conn, t0 - 1)
        lag = conn.execute(
            "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP "
            "(ORDER BY extract(epoch FROM ingested_at - created_at)) "
            "FROM query_history WHERE ingested_at >= to_timestamp(%s)",
            (t0 - 1,),
        ).fetchone()
    client.close()
    r.close()
    summary = Table(title="afterwrite demo", show_header=False)
    summary.add_row("records sent", f"{records - failed:,} (failed: {failed})")
    summary.add_row("rows persisted", f"{persisted:,}")
    summary.add_row("wall time", f"{elapsed:.1f} s")
    summary.add_row("end-to-end rate", f"{persisted / elapsed:,.0f} rows/s")
    latencies_us.sort()
    summary.add_row(
        "record_query p50 / p99",
        f"{statistics.median(latencies_us):.0f} / "
        f"{latencies_us[int(len(latencies_us) * 0.99) - 1]:.0f} µs",
    )
    if lag and lag[0] and lag[0][0] is not None:
        summary.add_row("write-behind lag p50 / p99", f"{lag[0][0]:.2f} / {lag[0][1]:.2f} s")
    console.print(summary)
    if persisted < records - failed:
        console.print(f"[red]{records - failed - persisted:,} records did not arrive[/red]")
        return 1
    return 0


def _embeddings(
    settings: Settings, count: int, console: Console, started: list[processes.Process]
) -> int:
    """Embed ``count`` knowledge-base articles, wait until beat published an index holding
    them, then search it."""
    from afterwrite.readers.index_reader import IndexReader

    model = settings.collection_model(DEMO_COLLECTION)
    console.print(f"\nembedding {count:,} knowledge-base articles with {model}")
    client = Client.from_env(settings)
    t0 = time.time()
    for doc_id, topic, text in corpus.documents(count):
        client.embed(DEMO_COLLECTION, doc_id, text, {"topic": topic})
    client.close()
    reader = IndexReader(DEMO_COLLECTION, index_dir=settings.index_path, settings=settings)
    with (
        psycopg.connect(settings.require_database_url(), autocommit=True) as conn,
        progress_bar(console) as progress,
    ):
        embedded_task = progress.add_task("embedded ", total=count, info="")
        indexed_task = progress.add_task("indexed  ", total=count, info="")
        deadline = time.monotonic() + 300
        target_seq: int | None = None  # the index must cover this, once all is embedded
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*), coalesce(max(seq), 0) FROM embeddings "
                "WHERE collection = %s AND model = %s AND enqueued_at >= to_timestamp(%s)",
                (DEMO_COLLECTION, model, t0 - 1),
            ).fetchone()
            embedded, top_seq = (int(row[0]), int(row[1])) if row else (0, 0)
            progress.update(
                embedded_task,
                completed=embedded,
                info=f"{embedded / max(time.time() - t0, 1e-6):,.0f} docs/s",
            )
            if target_seq is None and embedded >= count:
                target_seq = top_seq
            reader.reload()
            manifest = reader.manifest or {}
            covered = target_seq is not None and int(manifest.get("max_seq", -1)) >= target_seq
            progress.update(
                indexed_task,
                completed=count if covered else 0,
                info="" if reader.version is None else f"index version {reader.version}",
            )
            if covered:
                break
            if _worker_exited(started, console):
                return 1
            time.sleep(0.5)
        else:
            console.print("[red]the index was not built in time[/red]")
            return 1
        found = {
            doc_id: (topic, text)
            for doc_id, topic, text in conn.execute(
                "SELECT doc_id, metadata->>'topic', text FROM embeddings WHERE collection = %s",
                (DEMO_COLLECTION,),
            ).fetchall()
        }
    results = Table(title=f"searching {DEMO_COLLECTION!r} (index version {reader.version})")
    results.add_column("query", max_width=30)
    results.add_column("score", no_wrap=True)
    results.add_column("topic", no_wrap=True)
    results.add_column("document")
    for query in corpus.QUERIES:
        for rank, (doc_id, score) in enumerate(reader.search(query, k=3)):
            topic, text = found.get(doc_id, (None, None))
            text = text or ""
            results.add_row(
                query if rank == 0 else "",
                f"{score:.3f}",
                topic or "",
                f"{doc_id}: {text if len(text) <= 60 else text[:59] + '…'}",
            )
        results.add_section()
    console.print(results)
    return 0


def progress_bar(console: Console) -> Progress:
    """A transient progress bar with an ``info`` field, as every phase shows it."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _update(
    progress: Progress,
    task: Any,
    conn: psycopg.Connection[Any],
    r: redis.Redis,
    stream: str,
    t0: float,
) -> int:
    done = _count_rows(conn, t0 - 1)
    pipe = r.pipeline(transaction=False)
    pipe.xlen(stream)
    pipe.xrange(stream, "-", "+", count=1)
    backlog, oldest = pipe.execute()
    lag = time.time() - wire.entry_ms(oldest[0][0]) / 1000 if oldest else 0.0
    elapsed = max(time.time() - t0, 1e-6)
    progress.update(
        task,
        completed=done,
        info=f"{done / elapsed:,.0f} rows/s  backlog {int(backlog):,}  lag {lag:.1f}s",
    )
    return done


def _worker_exited(started: list[processes.Process], console: Console) -> bool:
    """True (after printing each process's log tail) when a started process has exited."""
    if all(p.alive() for p in started):
        return False
    console.print("[red]a worker process exited:[/red]")
    for p in started:
        console.print(p.tail())
    return True


def _wait_for_worker(
    r: redis.Redis, stream: str, started: list[processes.Process], console: Console
) -> bool:
    """Until a drain has created the stream's consumer group: the worker is up and beat kicks
    it. (Not "a consumer exists": Redis adds consumers only once they read an entry.)"""
    deadline = time.monotonic() + 90
    with console.status("waiting for the worker to start…"):
        while time.monotonic() < deadline:
            if not all(p.alive() for p in started):
                return False
            try:
                if r.xinfo_groups(stream):
                    return True
            except redis.ResponseError:
                pass  # no stream yet: the first drain creates it
            time.sleep(0.2)
    return False


def _safe(url: str) -> str:
    """The URL without its password, for printing."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}@{host}" if ":" not in creds else f"{scheme}://{user}:***@{host}"
