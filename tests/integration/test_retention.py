"""Retention deletes exactly what is older than the cut, in bounded chunks."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from afterwrite.core.errors import SettingsError
from afterwrite.core.settings import Settings, load_settings
from afterwrite.models.registry import Kind, kinds
from afterwrite.worker.app import celery_config, check_kind_settings
from afterwrite.worker.operations.retention import (
    RetentionConfigError,
    cutoff,
    purge_expired,
    run_retention,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def _fill(pg: psycopg.Connection[Any], days: range) -> dict[str, datetime]:
    rows = {str(uuid.uuid4()): NOW - timedelta(days=d, minutes=1) for d in days}
    rows[str(uuid.uuid4())] = NOW - timedelta(days=30)  # exactly at the cut: kept
    with pg.cursor() as cur:
        cur.executemany(
            "INSERT INTO query_history (id, created_at, query) VALUES (%s, %s, 'q')",
            list(rows.items()),
        )
    return rows


def _ids(pg: psycopg.Connection[Any]) -> set[str]:
    return {str(r[0]) for r in pg.execute("SELECT id FROM query_history")}


def test_deletes_exactly_the_rows_older_than_the_cut_in_chunks(pg: psycopg.Connection[Any]) -> None:
    rows = _fill(pg, range(100))
    cut = cutoff(NOW, 30)
    report = purge_expired(pg, kinds.get("query"), cut, chunk_rows=7, budget_s=60)
    expected_gone = {i for i, ts in rows.items() if ts < cut}
    assert len(expected_gone) == 70
    assert _ids(pg) == set(rows) - expected_gone
    assert report.deleted == 70
    assert report.chunks == 11  # ten full chunks of 7, then an empty one
    assert report.finished


def test_stops_at_its_time_budget_and_the_next_run_continues(pg: psycopg.Connection[Any]) -> None:
    _fill(pg, range(100))
    ticks = itertools.count()
    report = purge_expired(
        pg,
        kinds.get("query"),
        cutoff(NOW, 30),
        chunk_rows=10,
        budget_s=3,
        clock=lambda: float(next(ticks)),
    )
    assert (report.deleted, report.finished) == (20, False)
    rest = purge_expired(pg, kinds.get("query"), cutoff(NOW, 30), chunk_rows=10, budget_s=60)
    assert rest.deleted == 50
    assert rest.finished


def test_off_by_default_for_query_history(pg: psycopg.Connection[Any], settings: Settings) -> None:
    _fill(pg, range(50))
    reports = run_retention(pg, list(kinds), settings)
    rows = {r.kind for r in reports if r.table != "dead_letters"}
    assert "query" not in rows  # other kinds may declare their own
    assert len(_ids(pg)) == 51


def test_configured_retention_runs_for_that_kind(
    pg: psycopg.Connection[Any], settings: Settings
) -> None:
    recent = {str(uuid.uuid4()) for _ in range(3)}
    with pg.cursor() as cur:
        cur.executemany(
            "INSERT INTO query_history (id, created_at, query) VALUES (%s, now(), 'q')",
            [(i,) for i in recent],
        )
        cur.execute(
            "INSERT INTO query_history (id, created_at, query) "
            "VALUES (gen_random_uuid(), now() - interval '91 days', 'old')"
        )
    (report, *dead) = run_retention(
        pg, [kinds.get("query")], settings.model_copy(update={"retention_days": {"query": 90}})
    )
    assert (report.table, report.deleted) == ("query_history", 1)
    assert {r.table for r in dead} == {"dead_letters"}
    assert _ids(pg) == recent


def _dead(pg: psycopg.Connection[Any], kind: str, age: timedelta, n: int = 1) -> set[int]:
    ids = set()
    for i in range(n):
        raw = f"{kind} {age} {i}".encode()
        row = pg.execute(
            "INSERT INTO dead_letters (kind, payload_raw, payload_sha256, reason, detail,"
            " first_seen_at, last_seen_at) VALUES (%s, %s, sha256(%s), 'invalid', 'd',"
            " now() - %s, now() - %s) RETURNING id",
            (kind, raw, raw, age, age),
        ).fetchone()
        assert row is not None
        ids.add(int(row[0]))
    return ids


def test_dead_letters_expire_per_kind_in_chunks(
    pg: psycopg.Connection[Any], settings: Settings
) -> None:
    day = timedelta(days=1)
    kept = _dead(pg, "query", 29 * day) | _dead(pg, "agent_step", 6 * day)
    kept |= _dead(pg, "retired_kind", 29 * day)
    _dead(pg, "query", 31 * day, n=12)  # past the 30-day default
    _dead(pg, "agent_step", 8 * day)  # past its kind's own 7-day retention
    _dead(pg, "retired_kind", 31 * day)  # a kind no longer registered: the default applies
    configured = settings.model_copy(
        update={"retention_days": {"agent_step": 7}, "retention_chunk_rows": 5}
    )
    assert configured.dead_letter_retention_days == 30
    reports = [r for r in run_retention(pg, list(kinds), configured) if r.table == "dead_letters"]
    by_kind = {r.kind: r for r in reports}
    assert by_kind["query"].deleted == 12
    assert by_kind["query"].chunks == 3  # 5 + 5 + 2
    assert by_kind["agent_step"].deleted == 1
    assert by_kind["*"].deleted == 1
    assert {int(r[0]) for r in pg.execute("SELECT id FROM dead_letters")} == kept

    shorter = configured.model_copy(update={"dead_letter_retention_days": 5})
    run_retention(pg, list(kinds), shorter)
    assert pg.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)


class _Base(DeclarativeBase):
    pass


class _NoCreatedAt(_Base):
    __tablename__ = "test_retention_no_created_at"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)


def test_kinds_without_created_at_cannot_have_retention(pg: psycopg.Connection[Any]) -> None:
    with pytest.raises(RetentionConfigError, match="needs a created_at column"):
        purge_expired(pg, Kind("nocreated", _NoCreatedAt), NOW, chunk_rows=1, budget_s=1)


def test_retention_settings_must_name_registered_kinds() -> None:
    with pytest.raises(SettingsError, match="unknown kind"):
        check_kind_settings(load_settings({"AFTERWRITE_RETENTION_DAYS": "querry=30"}))
    check_kind_settings(load_settings({"AFTERWRITE_RETENTION_DAYS": "query=30"}))
    schedule = celery_config(load_settings({}, redis_url="redis://h/0"))["beat_schedule"]
    assert schedule["retention"]["task"] == "afterwrite.retention"
