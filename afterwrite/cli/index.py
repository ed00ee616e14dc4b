"""``afterwrite index status|rebuild|rollback`` and ``afterwrite search``.

Registered on the main group by afterwrite.cli.main; shared helpers come from
afterwrite.cli.common.
"""

from __future__ import annotations

import json

import click
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from afterwrite.cli.common import cli_settings, console, fail, printable, require_schema, safe

_STAGES = {"read": "reading vectors", "build": "building", "check": "recall check",
           "write": "writing"}  # fmt: skip


@click.group("index")
def index() -> None:
    """FAISS indexes: status, rebuild, rollback."""


@index.command("status")
@click.argument("collection", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def index_status(collection: str | None, as_json: bool) -> None:
    """Published version, kept versions, delta and recent builds per collection."""
    from afterwrite.worker.index import jobs

    settings = cli_settings()
    require_schema(settings)  # without embeddings it would print an empty table
    try:
        rows = jobs.status(settings, collection)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title="indexes")
    for col in ("collection", "version", "vectors", "type", "model", "recall@10", "built",
                "kept", "delta (n, max seq)", "db max seq"):  # fmt: skip
        table.add_column(col)
    for r in rows:
        m = r["manifest"] or {}
        recall = m.get("recall_at_10")
        table.add_row(
            safe(r["collection"]),
            safe(m.get("version", "-")) + (" (pinned)" if m.get("pinned") else ""),
            f"{m['vector_count']:,}" if m else "-",
            safe(m.get("index_type", r["manifest_error"] or "-")),
            safe(m.get("model", "-")),
            "-" if recall is None else f"{recall:.3f}",
            _ago(m.get("built_at")),
            ",".join(map(str, r["versions"])),
            "-" if r["delta"] is None else f"{r['delta'][1]}, {r['delta'][2]}",
            str(r["db_max_seq"]),
        )
    console.print(table)
    if collection and rows:
        builds = Table(title=f"recent builds of {safe(collection)}")
        for col in ("version", "status", "vectors", "type", "read s", "build s", "write s",
                    "recall", "detail"):  # fmt: skip
            builds.add_column(col)
        for b in rows[0]["recent_builds"]:
            builds.add_row(
                str(b["version"] or "-"), safe(b["status"]), str(b["vector_count"] or "-"),
                safe(b["index_type"] or "-"), _s(b["read_s"]), _s(b["build_s"]),
                _s(b["write_s"]), _s(b["recall_at_10"]), safe((b["detail"] or "")[:60]),
            )  # fmt: skip
        console.print(builds)


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _ago(ts: float | None) -> str:
    import time

    return "-" if ts is None else f"{time.time() - ts:,.0f}s ago"


@index.command("rebuild")
@click.argument("collection")
@click.option("--force", is_flag=True, help="Build even when unchanged (and clear a rollback pin).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def index_rebuild(collection: str, force: bool, as_json: bool) -> None:
    """Build COLLECTION's index now (with a progress bar) and publish it.

    Exit codes: 0 published, 1 nothing published (the reason is printed: no live vectors,
    unchanged since the published build, recall below the floor, pinned by a rollback, …),
    2 bad configuration.
    """
    from afterwrite.worker.index import jobs

    settings = cli_settings()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
        TimeElapsedColumn(),
        console=console,
        transient=as_json,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(_STAGES.get(stage, stage), total=max(total, 1))
            bar.update(tasks[stage], completed=done, total=max(total, 1))

        try:
            report = jobs.rebuild(settings, collection, force=force, progress=progress)
        except ValueError as exc:
            fail(str(exc))
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        if report.get("skipped"):
            raise SystemExit(1)
        return
    if report.get("skipped"):  # no live vectors, unchanged, rejected, pinned, another builder
        fail(printable(f"{collection}: not published: {report['why']}"), code=1)
    t = report["timings"]
    console.print(
        f"{safe(collection)}: v{report['version']} published, {report['vector_count']:,} vectors, "
        f"{safe(report['index_type'])}, recall@10 {report['recall_at_10']:.3f}; "
        f"read {t['read_s']:.2f}s, build {t['build_s']:.2f}s, write {t['write_s']:.2f}s"
    )


@index.command("rollback")
@click.argument("collection")
@click.option("--to", "to_version", type=int, help="Version to publish (default: previous).")
def index_rollback(collection: str, to_version: int | None) -> None:
    """Publish an earlier kept version again; scheduled rebuilds pause until --force."""
    from afterwrite.vectorindex.files import IndexFileError
    from afterwrite.worker.index import jobs

    try:
        manifest = jobs.rollback(cli_settings(), collection, to_version)
    except (ValueError, IndexFileError) as exc:
        fail(str(exc), code=1)
    console.print(f"{safe(collection)}: v{manifest['version']} published again (pinned)")


@click.command("search")
@click.argument("collection")
@click.argument("query")
@click.option("-k", "k", type=click.IntRange(min=1, max=1000), default=10, show_default=True)
@click.option(
    "--where",
    "where_json",
    metavar="JSON",
    help='Metadata filter: \'{"lang": ["en", "de"], "source": "wiki"}\' (equality; a list is'
    " any of its values).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def search(collection: str, query: str, k: int, where_json: str | None, as_json: bool) -> None:
    """Search COLLECTION's published index for QUERY (text, embedded with its model).

    Prints each hit's id, score, text and metadata, as the served index version stored them
    (no database needed).
    """
    from afterwrite.readers.index_reader import IndexReader, IndexUnavailable

    where = None
    if where_json is not None:
        try:
            where = json.loads(where_json)
        except ValueError as exc:
            fail(f"--where is not JSON: {exc}")
    settings = cli_settings()
    try:
        reader = IndexReader(collection, settings=settings)
        hits = reader.search(query, k, where=where)
    except (IndexUnavailable, ValueError) as exc:
        fail(str(exc), code=1)
    rows = [h.as_dict() for h in hits]
    if as_json:
        click.echo(json.dumps({"version": reader.version, "hits": rows}, ensure_ascii=False))
        return
    table = Table(title=f"{safe(collection)} v{reader.version}: {safe(repr(query))}")
    table.add_column("#", justify="right")
    table.add_column("doc_id")
    table.add_column("score", justify="right")
    table.add_column("text", overflow="fold")
    table.add_column("metadata", overflow="fold")
    for i, row in enumerate(rows, 1):
        meta = row["metadata"]
        table.add_row(
            str(i),
            safe(row["doc_id"]),
            f"{row['score']:.4f}",
            safe(_one_line(row["text"] or "-", 200)),
            "-" if meta is None else safe(_one_line(json.dumps(meta), 120)),
        )
    console.print(table)


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
