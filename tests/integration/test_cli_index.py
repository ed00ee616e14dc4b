"""``afterwrite index rebuild`` exit codes and ``afterwrite search`` output, against the real
services and the offline embedding model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from afterwrite.cli.main import main
from afterwrite.core.settings import Settings
from tests.index_helpers import add, random_unit


@pytest.fixture
def env(
    base_env: dict[str, str], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    for key in [k for k in os.environ if k.startswith("AFTERWRITE_")]:
        monkeypatch.delenv(key)
    for key, value in base_env.items():
        if key.startswith("AFTERWRITE_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("AFTERWRITE_INDEX_DIR", str(settings.index_path))
    return base_env


def test_rebuild_exits_1_with_the_reason_when_nothing_is_published(
    env: dict[str, str], settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    empty = CliRunner().invoke(main, ["index", "rebuild", "nothing"])
    assert empty.exit_code == 1, empty.output
    assert "nothing: not published: no live vectors" in empty.stderr
    as_json = CliRunner().invoke(main, ["index", "rebuild", "nothing", "--json"])
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["why"] == "no live vectors"

    add(pg, "docs", random_unit(40, 384), model=settings.collection_model("docs"))
    built = CliRunner().invoke(main, ["index", "rebuild", "docs"])
    assert built.exit_code == 0, built.output
    assert "docs: v1 published, 40 vectors" in built.stdout

    again = CliRunner().invoke(main, ["index", "rebuild", "docs"])
    assert again.exit_code == 1
    assert "docs: not published: unchanged since the published build" in again.stderr
    assert CliRunner().invoke(main, ["index", "rebuild", "docs", "--force"]).exit_code == 0


def _texts(pg: psycopg.Connection[Any], doc_ids: list[str]) -> None:
    for i, doc in enumerate(doc_ids):
        pg.execute(
            "UPDATE embeddings SET text = %s, metadata = %s WHERE collection = 'docs' "
            "AND doc_id = %s",
            (f"the text of document {i}", json.dumps({"source": f"wiki/{i}"}), doc),
        )


def test_search_shows_each_hits_text_and_metadata(
    env: dict[str, str], settings: Settings, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    doc_ids = add(pg, "docs", random_unit(30, 384), model=settings.collection_model("docs"))
    _texts(pg, doc_ids)
    assert CliRunner().invoke(main, ["index", "rebuild", "docs"]).exit_code == 0

    result = CliRunner().invoke(main, ["search", "docs", "what is in the documents?", "-k", "3"])
    assert result.exit_code == 0, result.output
    assert "the text of document" in result.stdout
    assert "wiki/" in result.stdout

    as_json = CliRunner().invoke(main, ["search", "docs", "documents", "-k", "5", "--json"])
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["version"] == 1
    assert len(report["hits"]) == 5
    by_id = {doc: i for i, doc in enumerate(doc_ids)}
    for hit in report["hits"]:
        i = by_id[hit["doc_id"]]
        assert hit["text"] == f"the text of document {i}"
        assert hit["metadata"] == {"source": f"wiki/{i}"}
        assert isinstance(hit["score"], float)
    scores = [h["score"] for h in report["hits"]]
    assert scores == sorted(scores, reverse=True)


def test_search_needs_no_database_and_filters(
    env: dict[str, str], settings: Settings, pg: psycopg.Connection[Any], monkeypatch: Any
) -> None:
    doc_ids = add(pg, "docs", random_unit(20, 384), model=settings.collection_model("docs"))
    _texts(pg, doc_ids)
    assert CliRunner().invoke(main, ["index", "rebuild", "docs"]).exit_code == 0
    monkeypatch.delenv("AFTERWRITE_DATABASE_URL")  # the index version carries the documents
    result = CliRunner().invoke(main, ["search", "docs", "anything", "-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["hits"]
    assert len(hits) == 2
    assert all(h["text"].startswith("the text of document") for h in hits)

    filtered = CliRunner().invoke(
        main,
        ["search", "docs", "anything", "--json", "--where", '{"source": ["wiki/4", "wiki/9"]}'],
    )
    assert filtered.exit_code == 0, filtered.output
    found = json.loads(filtered.stdout)["hits"]
    assert sorted(h["doc_id"] for h in found) == [doc_ids[4], doc_ids[9]]
    bad = CliRunner().invoke(main, ["search", "docs", "anything", "--where", '{"source": []}'])
    assert bad.exit_code == 1
    assert "an empty list matches nothing" in bad.stderr
    not_json = CliRunner().invoke(main, ["search", "docs", "anything", "--where", "source=x"])
    assert not_json.exit_code == 2
    assert "--where is not JSON" in not_json.stderr


def test_an_index_directory_serves_one_database(
    env: dict[str, str],
    settings: Settings,
    pg: psycopg.Connection[Any],
    empty_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two databases pointed at one index directory (the relative default, used from one
    checkout): the second neither publishes over the first's indexes nor lists them."""
    add(pg, "docs", random_unit(40, 384), model=settings.collection_model("docs"))
    assert CliRunner().invoke(main, ["index", "rebuild", "docs"]).exit_code == 0

    monkeypatch.setenv("AFTERWRITE_DATABASE_URL", empty_database)
    assert CliRunner().invoke(main, ["migrate"]).exit_code == 0
    with psycopg.connect(empty_database, autocommit=True) as other:
        add(other, "docs", random_unit(10, 384, seed=1), model=settings.collection_model("docs"))
    refused = CliRunner().invoke(main, ["index", "rebuild", "docs"])
    assert refused.exit_code == 2, refused.output
    assert "belongs to database" in refused.stderr
    assert "AFTERWRITE_INDEX_DIR" in refused.stderr

    status = CliRunner().invoke(main, ["status", "--json"])
    assert status.exit_code == 0, status.output
    report = json.loads(status.stdout)
    assert report["indexes"] == []
    assert report["index_dir"] == str(settings.index_path)
    assert "belongs to database" in report["index_dir_problem"]

    # The first database's index is untouched: still 40 vectors at v1.
    monkeypatch.setenv("AFTERWRITE_DATABASE_URL", env["AFTERWRITE_DATABASE_URL"])
    mine = json.loads(CliRunner().invoke(main, ["status", "--json"]).stdout)
    assert [(i["collection"], i["version"], i["vector_count"]) for i in mine["indexes"]] == [
        ("docs", 1, 40)
    ]
    assert mine["index_dir_problem"] is None
