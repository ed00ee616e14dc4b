"""``afterwrite embeddings …``: work on stored embeddings."""

from __future__ import annotations

import json

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from afterwrite.cli.common import cli_settings, console, db, fail, printable, safe


@click.group("embeddings")
def embeddings_cmd() -> None:
    """Stored embeddings: re-embed a collection after a model change."""


@embeddings_cmd.command("reembed")
@click.argument("collection")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def reembed_cmd(collection: str, as_json: bool) -> None:
    """Give COLLECTION's documents the vectors of its configured model.

    Run it after changing AFTERWRITE_EMBEDDING_MODEL, AFTERWRITE_EMBEDDING_COLLECTION_MODELS or
    AFTERWRITE_EMBEDDING_DIMENSIONS (the workers must run with the new setting too). Services
    keep searching the old index meanwhile; the next rebuild after this finishes publishes the
    new model's index. Safe to interrupt and run again: it continues where it stopped.
    """
    from afterwrite.core.collections import check_collection
    from afterwrite.embedders.providers import ProviderError
    from afterwrite.worker.embedding.reembed import reembed

    settings = cli_settings()
    try:
        check_collection(collection)
    except ValueError as exc:
        fail(str(exc))
    with (
        db(settings) as conn,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=as_json,
        ) as bar,
    ):
        task = bar.add_task(
            f"re-embedding {collection} with {settings.collection_model(collection)}",
            total=None,
        )
        try:
            report = reembed(
                settings,
                collection,
                conn,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        except ProviderError as exc:
            fail(f"embedding provider: {exc}; run the command again to continue", 1)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        console.print(
            f"{report.reembedded:,} of {report.remaining_before:,} documents re-embedded with "
            f"{safe(report.model)} ({report.cache_hits:,} from the cache, "
            f"{report.requests:,} provider requests)"
        )
    if report.failed:
        for doc_id, why in sorted(report.failed.items())[:20]:
            click.echo(f"  not re-embedded: {printable(doc_id)}: {printable(why)}", err=True)
        fail(
            f"{len(report.failed)} document(s) keep their old model; the index is not rebuilt "
            "until they are re-embedded or deleted",
            1,
        )
