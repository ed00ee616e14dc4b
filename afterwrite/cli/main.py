"""The ``afterwrite`` command line. Thin: parse, load settings, call the module that does it."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from afterwrite.cli.common import (
    Group,
    cli_settings,
    console,
    db,
    fail,
    printable,
    printable_json,
    require_schema,
    safe,
)
from afterwrite.cli.embeddings import embeddings_cmd
from afterwrite.cli.history import history_cmd
from afterwrite.cli.index import index, search
from afterwrite.cli.observe import health, metrics_server
from afterwrite.cli.stats import stats_cmd
from afterwrite.cli.transfer import export_cmd, import_cmd
from afterwrite.core.errors import SettingsError

if TYPE_CHECKING:
    from afterwrite.core.settings import Settings


def _celery(argv: list[str]) -> None:
    """Run a celery sub-command in this process with the afterwrite app."""
    from afterwrite.worker.app import app

    app.start(argv=argv)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="afterwrite")
def main() -> None:
    """afterwrite: write-behind persistence for AI backends.

    Redis Streams → Celery → PostgreSQL.
    """
    from afterwrite.core import logs

    level = os.environ.get("AFTERWRITE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("afterwrite").setLevel(level)
    json_logs = os.environ.get("AFTERWRITE_LOG_JSON", "").lower() in {"1", "true", "yes"}
    logs.install(logging.getLogger().handlers, json_format=json_logs)


@main.command()
@click.option("--revision", default="heads", show_default=True, help="Alembic revision.")
def migrate(revision: str) -> None:
    """Create or upgrade the database schema (Alembic)."""
    from afterwrite import migrations

    settings = cli_settings()
    try:
        migrations.upgrade(settings.sqlalchemy_url(), revision, settings.migration_dirs)
    except SettingsError as exc:
        fail(str(exc))
    click.echo(f"database at revision {revision}")
    _clear_problems(settings)


def _clear_problems(settings: Settings) -> None:
    """After a migration, workers stopped by a configuration error try again at once."""
    if not settings.redis_url:
        return
    import redis

    from afterwrite.worker import problems

    try:
        r = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        with r:
            if problems.clear(r, settings.stream_prefix):
                click.echo("cleared the workers' configuration problems; they retry now")
    except redis.RedisError as exc:
        click.echo(f"could not clear the workers' problems in Redis ({exc})", err=True)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("-c", "--concurrency", type=int, default=None, help="Worker processes.")
@click.pass_context
def worker(ctx: click.Context, concurrency: int | None) -> None:
    """Start a Celery worker that drains the streams (extra args go to celery worker)."""
    settings = cli_settings()
    try:
        settings.require_database_url()
    except SettingsError as exc:
        fail(str(exc))
    argv = ["worker", "--loglevel", settings.log_level]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    _celery(argv + list(ctx.args))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def beat(ctx: click.Context) -> None:
    """Start Celery beat: drains, reclaims, embedding, index rebuilds and refreshes, retention."""
    settings = cli_settings()
    _celery(["beat", "--loglevel", settings.log_level, *ctx.args])


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option(
    "--unauthenticated",
    is_flag=True,
    help="Run without authentication (local development only).",
)
@click.pass_context
def flower(ctx: click.Context, unauthenticated: bool) -> None:
    """Start Flower with HTTP basic authentication (AFTERWRITE_FLOWER_USER/PASSWORD).

    Every page asks for it, Flower's /metrics and /healthcheck included.
    """
    from afterwrite.worker.flower import TASKS_COLUMNS, require_authentication_everywhere

    settings = cli_settings()
    argv = [
        "flower",
        f"--port={settings.flower_port}",
        f"--address={settings.flower_address}",
        f"--tasks_columns={TASKS_COLUMNS}",  # extra args given after it take precedence
    ]
    if settings.flower_user and settings.flower_password:
        # Through the environment, not argv: argv is visible to every user in `ps`.
        secret = settings.flower_password.get_secret_value()
        os.environ["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{secret}"
    elif not (unauthenticated or settings.flower_unauthenticated):
        fail(
            "Flower needs credentials: set AFTERWRITE_FLOWER_USER and "
            "AFTERWRITE_FLOWER_PASSWORD, or pass --unauthenticated for local development"
        )
    require_authentication_everywhere()
    _celery(argv + list(ctx.args))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Backlog per stream, rows per table, dead letters, freshness, embeddings, indexes."""
    from afterwrite.cli.observe import status_tables
    from afterwrite.worker.operations.status import collect

    settings = cli_settings()
    if settings.database_url:  # it reads tables that would otherwise show as "0 rows"
        require_schema(settings)
    try:
        report = collect(settings)
    except SettingsError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    streams = Table(title="streams")
    for col in ("kind", "length", "pending", "consumers", "oldest entry age"):
        streams.add_column(col, justify="right" if col != "kind" else "left")
    for s in report.streams:
        age = "-" if s.oldest_age_s is None else f"{s.oldest_age_s:.1f}s"
        streams.add_row(safe(s.kind), str(s.length), str(s.pending), str(s.consumers), age)
    tables = Table(title="tables")
    tables.add_column("kind")
    tables.add_column("table")
    tables.add_column("rows", justify="right")
    for t in report.tables:
        tables.add_row(safe(t.kind), safe(t.table), f"{'~' if t.estimated else ''}{t.rows:,}")
    dead = Table(title="dead letters")
    dead.add_column("kind")
    dead.add_column("reason")
    dead.add_column("count", justify="right")
    for kind, reasons in report.dead_letters.items():
        for reason, n in reasons.items():
            dead.add_row(safe(kind), safe(reason), f"{n:,}")
    if report.problems:
        stopped = Table(
            title="stopped by a configuration error (fix, then `afterwrite migrate` or wait)"
        )
        for col in ("task", "error", "since", "failures", "retry in"):
            stopped.add_column(col)
        for p in report.problems:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p.since))
            stopped.add_row(
                safe(p.task), safe(p.error), since, str(p.failures), f"{p.retry_in_s:.0f}s"
            )
        console.print(stopped)
    console.print(streams, tables, dead, *status_tables(report))


# --- dead letters ---------------------------------------------------------------------------
def _dlq_filter(
    kind: str | None, reason: str | None, since: str | None, until: str | None, ids: tuple[int, ...]
) -> Any:
    from afterwrite.worker.operations.dead_letter_admin import Filter, parse_time

    try:
        return Filter(
            kind=kind,
            reason=reason,
            since=parse_time(since) if since else None,
            until=parse_time(until) if until else None,
            ids=ids,
        )
    except ValueError as exc:
        fail(str(exc))


def _dlq_options(f: Any) -> Any:
    for option in reversed(
        [
            click.option("--kind", help="Only this record kind."),
            click.option("--reason", help="A reason (invalid, rejected) or an error code."),
            click.option("--since", help="Last seen at or after: ISO time or age (30m, 2h, 7d)."),
            click.option("--until", help="Last seen before: ISO time or age."),
            click.option("--id", "ids", type=int, multiple=True, help="Only these ids."),
        ]
    ):
        f = option(f)
    return f


@main.group()
def dlq() -> None:
    """Dead letters: list, show, replay, purge."""


@dlq.command("list")
@_dlq_options
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dlq_list(
    kind: str | None,
    reason: str | None,
    since: str | None,
    until: str | None,
    ids: tuple[int, ...],
    limit: int,
    as_json: bool,
) -> None:
    """Dead letters, newest first."""
    from afterwrite.worker.operations import dead_letter_admin as store

    flt = _dlq_filter(kind, reason, since, until, ids)
    with db(cli_settings()) as conn:
        rows = store.list_dead(conn, flt, limit)
        total = store.count_dead(conn, flt)
    if as_json:
        click.echo(json.dumps({"total": total, "dead_letters": rows}, default=str, indent=2))
        return
    table = Table(title=f"dead letters ({len(rows)} of {total:,})")
    for col in ("id", "kind", "reason", "code", "deliveries", "last seen", "detail"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["id"]),
            safe(r["kind"]),
            safe(r["reason"]),
            safe(r["error_code"] or ""),
            str(r["delivery_count"]),
            r["last_seen_at"].isoformat(timespec="seconds"),
            safe((r["detail"] or "")[:80]),
        )
    console.print(table)


@dlq.command("show")
@click.argument("dead_id", type=int)
def dlq_show(dead_id: int) -> None:
    """One dead letter with its payload (as JSON)."""
    from afterwrite.worker.operations import dead_letter_admin as store

    with db(cli_settings()) as conn:
        row = store.show(conn, dead_id)
    if row is None:
        fail(f"no dead letter with id {dead_id}", code=1)
    click.echo(printable_json(json.dumps(row, default=str, indent=2, ensure_ascii=False)))


@dlq.command("replay")
@_dlq_options
@click.option("--dry-run", is_flag=True, help="Validate only; change nothing.")
def dlq_replay(
    kind: str | None,
    reason: str | None,
    since: str | None,
    until: str | None,
    ids: tuple[int, ...],
    dry_run: bool,
) -> None:
    """Re-validate matching dead letters and re-enqueue the valid ones (idempotent)."""
    import redis

    from afterwrite.worker.operations import dead_letter_admin as store

    settings = cli_settings()
    flt = _dlq_filter(kind, reason, since, until, ids)
    r = redis.Redis.from_url(settings.require_redis_url())
    with db(settings) as conn:
        report = store.replay(conn, r, settings, flt, dry_run=dry_run)
    r.close()
    verb = "would replay" if dry_run else "replayed"
    click.echo(
        f"{verb} {report.replayed}; still invalid {report.still_invalid}; "
        f"unknown kind {report.unknown_kind}; capped {report.capped} (cannot be replayed)"
    )
    for p in report.problems:
        click.echo(f"  #{p['id']}: {printable(p['why'])}")


@dlq.command("purge")
@_dlq_options
@click.option("--yes", is_flag=True, help="Do it (without it, only count).")
def dlq_purge(
    kind: str | None,
    reason: str | None,
    since: str | None,
    until: str | None,
    ids: tuple[int, ...],
    yes: bool,
) -> None:
    """Delete matching dead letters (asks for --yes)."""
    from afterwrite.worker.operations import dead_letter_admin as store

    flt = _dlq_filter(kind, reason, since, until, ids)
    with db(cli_settings()) as conn:
        if not yes:
            n = store.count_dead(conn, flt)
            click.echo(f"{n} dead letters match; run again with --yes to delete them")
            return
        click.echo(f"deleted {store.purge(conn, flt)} dead letters")


@main.command()
@click.option("--records", default=20_000, show_default=True, help="Query records to send.")
@click.option("--rate", default=0.0, help="Records per second (0: as fast as possible).")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where private PostgreSQL/Redis live (default: AFTERWRITE_DATA_DIR).",
)
@click.option(
    "--private",
    is_flag=True,
    help="Start private PostgreSQL/Redis even when local ones are reachable.",
)
@click.option(
    "--documents",
    default=1000,
    show_default=True,
    help="Knowledge-base articles to embed, index and search (0: skip that part).",
)
def demo(records: int, rate: float, data_dir: Path | None, private: bool, documents: int) -> None:
    """Run the whole pipeline on realistic LLM query traffic and show it landing, then embed,
    index and search a small knowledge base."""
    from afterwrite.demo.run import run_demo

    settings = cli_settings()
    code = run_demo(
        settings,
        records=records,
        rate=rate,
        data_dir=data_dir,
        console=console,
        private=private,
        documents=documents,
    )
    sys.exit(code)


@main.command()
@click.option("--entries", default=200_000, show_default=True, help="Backlog size to drain.")
@click.option("--calls", default=20_000, show_default=True, help="record_query calls to time.")
@click.option("--baseline/--no-baseline", default=True, help="Run the celery-batches baseline.")
@click.option(
    "--baseline-entries", type=int, default=None, help="Events for the baseline (default 20k)."
)
@click.option(
    "--compare-entries",
    type=int,
    default=None,
    help="Second, smaller backlog for the memory comparison (0 skips it).",
)
@click.option("--concurrency", default=2, show_default=True, help="Worker processes.")
@click.option(
    "--idle-seconds",
    type=float,
    default=60.0,
    show_default=True,
    help="Measure an idle worker and beat this long (0 skips it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON on stdout.")
@click.option(
    "--suite",
    "suites",
    type=click.Choice(["pipeline", "embeddings", "index", "loadtest", "startup", "history", "all"]),
    multiple=True,
    default=("pipeline",),
    show_default=True,
    help="What to measure (repeatable): the record/drain pipeline, embedding batching and the "
    "offline model, index rebuild/search at 100k and 1M vectors, the example web app under "
    "load (wrk), start-up (client import, afterwrite --help, afterwrite status), History reads "
    "on 1,000,000 stored queries.",
)
def bench(
    entries: int,
    calls: int,
    baseline: bool,
    baseline_entries: int | None,
    compare_entries: int | None,
    concurrency: int,
    idle_seconds: float,
    as_json: bool,
    suites: tuple[str, ...],
) -> None:
    """Measure hot-path latency and drain throughput against their ceilings (and, with
    --suite, embeddings, indexes, the web app under load, start-up times).

    Runs from a checkout (the benchmarks are not in the wheel). Uses its own database
    (afterwrite_bench) and stream prefix; never touches real data.
    """
    _use_checkout_benchmarks()
    from benchmarks.main import run_bench
    from benchmarks.suites import SUITES, run_suites

    settings = cli_settings()
    chosen = SUITES if "all" in suites else tuple(dict.fromkeys(suites))
    # With --json, stdout carries only the JSON; tables and progress go to stderr.
    out_console = Console(stderr=True) if as_json else console
    result: dict[str, Any] = {}
    if "pipeline" in chosen:
        result = run_bench(
            settings,
            entries=entries,
            calls=calls,
            baseline=baseline,
            console=out_console,
            baseline_entries=baseline_entries,
            compare_entries=compare_entries,
            concurrency=concurrency,
            idle_s=idle_seconds,
        )
    others = run_suites(settings, chosen, out_console, concurrency=concurrency)
    if others:
        result = {**({"pipeline": result} if result else {}), **others}
    if as_json:
        click.echo(json.dumps(result, indent=2))


def _use_checkout_benchmarks() -> None:
    """Put the checkout holding ``benchmarks/`` on the path (this process's and its children's).

    The benchmarks are development code and not in the wheel: ``afterwrite bench`` runs from a
    checkout (an editable install, or any install started inside the checkout).
    """
    import afterwrite

    for root in (Path.cwd(), Path(afterwrite.__file__).resolve().parents[1]):
        if (root / "benchmarks" / "__init__.py").is_file():
            break
    else:
        fail(
            "afterwrite bench runs from a checkout of afterwrite: benchmarks/ is development "
            "code and not in the installed package (git clone, then ./dev bench)"
        )
    sys.path.insert(0, str(root))
    paths = [str(root), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)


@main.command("erase")
@click.option("--user-id", required=True, help="The user whose data is erased.")
@click.option("--dry-run", is_flag=True, help="Count what would be erased; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def erase(user_id: str, dry_run: bool, as_json: bool) -> None:
    """Erase one user's data in every store: rows, metric points, embeddings and their cache,
    dead letters, index versions, pending stream entries (a tombstone), this host's spill
    journals. Records counts (not data) in the erasure log. Idempotent."""
    from afterwrite.worker.operations.erasure import erase_user

    settings = cli_settings()
    require_schema(settings)
    report = erase_user(user_id, settings=settings, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    table = Table(
        title=f"{'would erase' if dry_run else 'erased'} (user sha256 {report.user_hash[:16]}…)"
    )
    table.add_column("store")
    table.add_column("count", justify="right")
    for store, n in report.counts.items():
        table.add_row(store, f"{n:,}")
    console.print(table)
    if report.collections:
        console.print(f"indexes rebuilt: {', '.join(safe(c) for c in report.collections)}")
    if report.counts.get("spill_segments_busy"):
        console.print(
            "spill segments held by running producers were left to the tombstone; run "
            "`afterwrite erase` on every host that spills (see README, Privacy)"
        )


main.add_command(embeddings_cmd)
main.add_command(history_cmd)
main.add_command(index)
main.add_command(search)
main.add_command(metrics_server)
main.add_command(health)
main.add_command(stats_cmd)
main.add_command(export_cmd)
main.add_command(import_cmd)

if __name__ == "__main__":
    main()
