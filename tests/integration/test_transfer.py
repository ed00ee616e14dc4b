"""``afterwrite export`` / ``import``: JSON Lines out of and back into PostgreSQL, exactly."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import time
import tracemalloc
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import msgspec
import psycopg
import pytest
import redis
from click.testing import CliRunner, Result

from afterwrite.cli.transfer import export_cmd, import_cmd
from afterwrite.core import wire
from afterwrite.core.ids import uuid7_str
from afterwrite.core.settings import Settings
from afterwrite.demo import traffic
from afterwrite.models.base import writable_columns
from afterwrite.models.registry import kinds
from afterwrite.worker.operations.transfer import (
    EXPORT_FETCH_ROWS,
    ImportAborted,
    LongLine,
    export_rows,
    import_rows,
    read_lines,
)
from afterwrite.worker.runtime import Runtime


@click.group()
def cli() -> None:
    """The transfer commands alone (afterwrite.cli.main registers them on ``main``)."""


cli.add_command(export_cmd)
cli.add_command(import_cmd)

COLUMNS = [c.name for c in writable_columns(kinds.get("query").table)]
"""Every column but the generated search_vector, which PostgreSQL recomputes on import."""
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")


@pytest.fixture
def env(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("AFTERWRITE_")]:
        monkeypatch.delenv(key)
    for key, value in base_env.items():
        if key.startswith("AFTERWRITE_"):
            monkeypatch.setenv(key, value)


def run(*args: str, code: int = 0, stdin: bytes | None = None) -> Result:
    result = CliRunner().invoke(cli, list(args), input=stdin)
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def import_json(path: Path | str, *extra: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(run("import", str(path), "--json", *extra).stdout)
    return report


def nested(depth: int) -> Any:
    return {"leaf": "é"} if depth == 0 else {"d": depth, "next": [nested(depth - 1)]}


def edge_records() -> list[dict[str, Any]]:
    """What a round trip is likely to break: text, nesting, NULLs, extreme numbers and times."""
    base = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
    return [
        {
            "id": uuid7_str(),
            "created_at": base,
            "query": 'ünïcödé 世界 😀 עברית \u2028\u00ad "quoted" \\ back\nslash\ttab\r\x01',
            "response": "e\u0301 combining; \U0010fffd last plane",
            "model_ids": ["gpt-4o", "m\u00e9"],
            "metadata": {"emoji": "😀", "nested": nested(30), "empty": {}, "list": []},
        },
        # every nullable column NULL; model_ids and ingested_at take their defaults
        {"id": uuid7_str(), "created_at": base, "query": "nulls"},
        {
            "id": uuid7_str(),
            "created_at": datetime(2026, 3, 4, tzinfo=UTC),  # microseconds 0 still written
            "query": "floats",
            "response_time_ms": 0.1,
            "retrieval": {
                "floats": [0.1, 1e-300, 5e-324, 1.7976931348623157e308, -0.0, 1 / 3, 2.5],
                "ints": [2**64 - 1, -(2**63), 2**53 + 1, 0, -1],  # msgpack's limits
            },
            "metadata": {"t": True, "f": False, "n": None},
        },
        {"id": uuid7_str(), "created_at": base, "query": "tiny", "response_time_ms": 1e-300},
        {"id": uuid7_str(), "created_at": base, "query": "sub", "response_time_ms": 5e-324},
        {"id": uuid7_str(), "created_at": base, "query": "neg0", "response_time_ms": -0.0},
        {
            "id": uuid7_str(),
            "created_at": datetime(1, 1, 1, tzinfo=UTC),
            "query": "int limits",
            "prompt_tokens": 2**31 - 1,  # counts are never negative (a domain rule)
            "completion_tokens": 0,
        },
        {
            "id": uuid7_str(),
            # the latest a created_at may be: now plus AFTERWRITE_MAX_FUTURE_SKEW_S
            "created_at": datetime.now(UTC).replace(microsecond=999999) + timedelta(hours=23),
            "query": "future",
        },
    ]


def drain_all(rdb: redis.Redis, settings: Settings, records: Sequence[Any]) -> None:
    key = wire.stream_key(settings.stream_prefix, "query")
    pipe = rdb.pipeline(transaction=False)
    for record in records:
        pipe.xadd(key, {wire.PAYLOAD_FIELD: wire.encode(record)})
    pipe.execute()
    rt = Runtime(settings)
    try:
        stored = 0
        while stored < len(records):
            report = rt.drain("query").run(budget_s=10)
            assert report.dead_lettered == 0
            assert report.entries, "stream ran dry before every record was stored"
            stored += report.inserted
    finally:
        rt.close()


def test_round_trip_is_byte_identical_and_reimport_changes_nothing(
    env: None, settings: Settings, rdb: redis.Redis, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    records = [traffic.as_record(kw) for kw in traffic.queries(2_000)] + edge_records()
    drain_all(rdb, settings, records)
    # Numbers neither a double nor msgpack can hold, which only SQL (not the drain) can store:
    # kept exactly.
    exact = str(uuid.uuid4())
    pg.execute(
        "INSERT INTO query_history (id, created_at, query, retrieval) VALUES (%s, now(), "
        """'exact', '{"x": 0.1000000000000000000001, "big": [1e400, 1e30, -1e25]}')""",
        (exact,),
    )
    total = len(records) + 1

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    result = run("export", "query", "--output", str(a))
    assert f"exported {total:,} query rows to {a}" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "a.jsonl.partial").exists()
    lines = a.read_bytes().splitlines()
    assert len(lines) == total
    rows = [json.loads(line) for line in lines]
    assert all(list(r) == COLUMNS for r in rows)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert all(ISO_UTC.match(r["created_at"]) and ISO_UTC.match(r["ingested_at"]) for r in rows)
    by_query = {r["query"]: r for r in rows}
    assert by_query["nulls"]["retrieval"] is None
    assert by_query["nulls"]["model_ids"] == []
    assert by_query["floats"]["created_at"] == "2026-03-04T00:00:00.000000+00:00"
    assert by_query["int limits"]["created_at"] == "0001-01-01T00:00:00.000000+00:00"
    assert b"0.1000000000000000000001" in next(line for line in lines if exact.encode() in line)

    pg.execute("TRUNCATE query_history")
    report = import_json(a)
    assert report == {
        "kind": "query",
        "lines": total,
        "inserted": total,
        "duplicates": 0,
        "dead_lettered": 0,
        "batches": 1,
        "codes": {},
    }
    run("export", "query", "-o", str(b))
    assert a.read_bytes() == b.read_bytes()

    again = import_json(a, "--batch-size", "500")
    assert (again["inserted"], again["duplicates"], again["dead_lettered"]) == (0, total, 0)
    assert again["batches"] == (total + 499) // 500
    assert pg.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)


def test_export_to_stdout_and_text_streams_match_the_file(
    env: None, settings: Settings, rdb: redis.Redis, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    drain_all(rdb, settings, edge_records())
    path = tmp_path / "q.jsonl"
    run("export", "query", "-o", str(path))
    assert run("export", "query").stdout_bytes == path.read_bytes()
    text = io.StringIO()
    assert export_rows(pg, "query", text) == len(edge_records())
    assert text.getvalue().encode() == path.read_bytes()


def test_import_from_stdin(env: None, pg: psycopg.Connection[Any]) -> None:
    line = {"id": uuid7_str(), "created_at": "2026-01-01T00:00:00+00:00", "query": "q"}
    result = run("import", "-", stdin=json.dumps(line).encode() + b"\n")
    assert "imported 1 lines as query: 1 inserted, 0 duplicates, 0 dead-lettered" in result.stdout
    assert pg.execute("SELECT query FROM query_history").fetchall() == [("q",)]


def test_invalid_lines_are_dead_lettered_and_the_rest_imported(
    env: None, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    def line(**fields: Any) -> bytes:
        record = {"id": uuid7_str(), "created_at": "2026-01-01T00:00:00+00:00", "query": "q"}
        return json.dumps({**record, **fields}).encode()

    good = line(query="first")
    lines = [
        good,  # 1
        b'{"id": "0192',  # 2 truncated
        line(query="a\u0000b"),  # 3 NUL in text
        line(colour="blue"),  # 4 unknown field
        b"   ",  # 5 blank: skipped, not counted
        b'{"query": "\xff\xfe"}',  # 6 not UTF-8
        b"[1, 2]",  # 7 not an object
        b'{"query": "\\ud800"}',  # 8 lone surrogate escape
        good,  # 9 the same row again
        line(query=None),  # 10 required field missing
        line(query="last", metadata={"k": [1, 2.5]}),  # 11
        line(prompt_tokens=2**31),  # 12 out of the column's range
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = import_json(path)
    assert report["lines"] == 11
    assert (report["inserted"], report["duplicates"], report["dead_lettered"]) == (2, 1, 8)
    assert report["codes"] == {
        "not_json": 3,
        "nul_byte": 1,
        "unknown_field": 1,
        "not_a_map": 1,
        "missing_field": 1,
        "out_of_range": 1,
    }
    assert sorted(r[0] for r in pg.execute("SELECT query FROM query_history")) == [
        "first",
        "last",
    ]
    dead = pg.execute(
        "SELECT entry_id, kind, reason, error_code, payload_raw, payload IS NULL "
        "FROM dead_letters ORDER BY entry_id"
    ).fetchall()
    by_line = {int(d[0].rsplit(":", 1)[1]): d for d in dead}
    assert sorted(by_line) == [2, 3, 4, 6, 7, 8, 10, 12]
    for n, (entry_id, kind, reason, code, raw, no_payload) in by_line.items():
        assert entry_id == f"mixed.jsonl:{n}"
        assert (kind, reason) == ("query", "invalid")
        assert bytes(raw) == lines[n - 1]
        assert no_payload == (code == "not_json")

    # Again: no new rows, and the dead letters are counted again, not duplicated.
    again = import_json(path)
    assert (again["inserted"], again["duplicates"], again["dead_lettered"]) == (0, 3, 8)
    assert pg.execute("SELECT count(*), min(delivery_count) FROM dead_letters").fetchone() == (
        8,
        2,
    )


def test_a_file_of_the_wrong_kind_stops_before_storing_anything(
    env: None, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    path = tmp_path / "other.jsonl"
    path.write_bytes(b"".join(b'{"id": "%d", "vector": [0.1]}\n' % i for i in range(150)))
    result = run("import", str(path), code=1)
    assert "150 of the first 150 lines are not valid 'query' rows" in result.stderr
    assert "Is the kind right?" in result.stderr
    assert pg.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
    with path.open("rb") as f, pytest.raises(ImportAborted):
        import_rows(pg, "query", f)
    report = import_json(path, "--no-guard")
    assert report["dead_lettered"] == 150


def test_since_and_until_filter_on_created_at(
    env: None, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    created = {
        "jan1": datetime(2024, 1, 1, tzinfo=UTC),
        "jan2": datetime(2024, 1, 2, tzinfo=UTC),
        "jan3": datetime(2024, 1, 3, tzinfo=UTC),
        "1h": now - timedelta(hours=1),
        "3h": now - timedelta(hours=3),
    }
    for name, at in created.items():
        pg.execute(
            "INSERT INTO query_history (id, created_at, query) VALUES (%s, %s, %s)",
            (uuid7_str(), at, name),
        )

    def names(*args: str) -> list[str]:
        out = run("export", "query", *args).stdout_bytes
        return sorted(json.loads(line)["query"] for line in out.splitlines())

    assert names("--since", "2024-01-02", "--until", "2024-01-03") == ["jan2"]
    assert names("--until", "2024-01-02T00:00:00+00:00") == ["jan1"]
    assert names("--since", "2h") == ["1h"]
    assert names("--since", "1d", "--until", "2h") == ["3h"]
    assert names() == sorted(created)
    bad = run("export", "query", "--since", "yesterday", code=2)
    assert "'yesterday' is neither an ISO time nor an age" in bad.stderr


def test_unknown_kind_fails_with_the_registered_names(env: None, tmp_path: Path) -> None:
    for args in (["export", "nope"], ["import", "-", "--kind", "nope"]):
        result = run(*args, code=2, stdin=b"")
        assert "unknown record kind 'nope'; registered: " in result.stderr
        assert "query" in result.stderr


def test_no_rows_export_an_empty_file(env: None, tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    result = run("export", "query", "-o", str(path))
    assert path.read_bytes() == b""
    assert "exported 0 query rows" in result.stderr
    assert run("export", "query").stdout_bytes == b""
    assert import_json(path)["lines"] == 0


def test_unreadable_and_unwritable_files_fail_clearly(env: None, tmp_path: Path) -> None:
    missing = run("import", str(tmp_path / "missing.jsonl"), code=2)
    assert f"cannot read {tmp_path / 'missing.jsonl'}: No such file or directory" in (
        missing.stderr
    )
    nowhere = tmp_path / "no" / "such" / "dir.jsonl"
    out = run("export", "query", "-o", str(nowhere), code=2)
    assert f"cannot write {nowhere}: No such file or directory" in out.stderr


def test_export_never_follows_or_overwrites_a_file_it_did_not_create(
    env: None, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    pg.execute(
        "INSERT INTO query_history (id, created_at, query) VALUES (%s, now(), 'q')",
        (uuid7_str(),),
    )
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "rows.jsonl"
    planted = tmp_path / "rows.jsonl.partial"
    planted.symlink_to(victim)
    result = run("export", "query", "-o", str(out), code=2)
    assert f"{planted} already exists" in result.stderr
    assert victim.read_bytes() == b"precious"
    assert planted.is_symlink()
    assert not out.exists()
    planted.unlink()

    # a stale partial (a regular file) is left alone as well
    planted.write_bytes(b"someone else's")
    run("export", "query", "-o", str(out), code=2)
    assert planted.read_bytes() == b"someone else's"
    planted.unlink()

    # the output name itself a link: the rename replaces the link, never its target
    out.symlink_to(victim)
    old = os.umask(0o022)
    try:
        run("export", "query", "-o", str(out))
    finally:
        os.umask(old)
    assert victim.read_bytes() == b"precious"
    assert not out.is_symlink()
    assert json.loads(out.read_bytes())["query"] == "q"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # user data: private
    assert not planted.exists()


def test_import_bounds_line_length_and_nesting(
    env: None, pg: psycopg.Connection[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AFTERWRITE_IMPORT_MAX_LINE_BYTES", "4096")

    def line(**fields: Any) -> bytes:
        record = {"id": uuid7_str(), "created_at": "2026-01-01T00:00:00+00:00", "query": "q"}
        return json.dumps({**record, **fields}).encode()

    deep = line(query="deep")[:-1] + b', "metadata": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    long = line(query="x" * 100_000)
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join([line(query="first"), deep, long, line(query="last")]) + b"\n")
    report = import_json(path)
    assert (report["inserted"], report["dead_lettered"]) == (2, 2)
    assert report["codes"] == {"too_deep": 1, "line_too_long": 1}
    rows = pg.execute(
        "SELECT entry_id, error_code, detail, payload_raw, payload_sha256, payload"
        " FROM dead_letters ORDER BY entry_id"
    ).fetchall()
    by_line = {r[0]: r[1:] for r in rows}
    assert by_line["hostile.jsonl:2"][0] == "too_deep"
    code, detail, raw, sha, payload = by_line["hostile.jsonl:3"]
    assert code == "line_too_long"
    assert f"line of {len(long):,} bytes, limit 4,096" in detail
    assert bytes(raw) == long[:4097]  # only the head was read
    assert bytes(sha) == hashlib.sha256(long).digest()  # of the whole line
    assert payload["afterwrite_truncated"]["bytes"] == len(long)


def test_read_lines_never_holds_an_over_long_line() -> None:
    long = b"y" * (3 << 20)
    f = io.BytesIO(b"short\n" + long + b"\r\nafter\n" + long)
    got = list(read_lines(f, 1000))
    assert got[0] == b"short\n"
    assert isinstance(got[1], LongLine)
    assert bytes(got[1]) == long[:1001]
    assert (got[1].length, got[1].sha256) == (len(long), hashlib.sha256(long).digest())
    assert got[2] == b"after\n"
    assert isinstance(got[3], LongLine)
    assert got[3].length == len(long)  # the last line, without a newline
    assert len(got) == 4


def test_a_value_json_cannot_hold_fails_the_export_and_leaves_no_file(
    env: None, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    bad = uuid7_str()
    pg.execute(
        "INSERT INTO query_history (id, created_at, query, response_time_ms) VALUES "
        "(%s, now(), 'nan', 'NaN')",
        (bad,),
    )
    path = tmp_path / "nan.jsonl"
    result = run("export", "query", "-o", str(path), code=1)
    assert f"query_history id {bad}: response_time_ms: nan has no JSON form" in result.stderr
    assert list(tmp_path.iterdir()) == []


class _CountingSink(io.RawIOBase):
    """Counts what an export writes without keeping it."""

    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.size += len(b)
        return len(b)


def test_export_streams_instead_of_holding_every_row(pg: psycopg.Connection[Any]) -> None:
    pg.execute(
        "INSERT INTO query_history (id, created_at, query, response, model_ids, metadata) "
        "SELECT gen_random_uuid(), now() - i * interval '1 second', 'q' || i, "
        "repeat('x', 1000), '[\"gpt-4o\"]', jsonb_build_object('i', i) "
        "FROM generate_series(1, 50000) AS i"
    )
    sink = _CountingSink()
    steps: list[int] = []
    tracemalloc.start()
    try:
        n = export_rows(pg, "query", sink, progress=steps.append)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 50_000
    assert steps == list(range(EXPORT_FETCH_ROWS, 50_001, EXPORT_FETCH_ROWS))
    assert sink.size > 55_000_000
    # One fetch of ~1.1 KB rows, decoded and encoded: a few MB, not the ~60 MB of all rows.
    assert peak < 12_000_000, f"peak {peak:,} bytes"


@pytest.mark.benchmark
def test_transfer_rates_on_realistic_rows(
    pg: psycopg.Connection[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Export and import rows/s on 100k realistic query rows (``-m benchmark -s``)."""
    count = 100_000
    encode = msgspec.json.Encoder().encode
    source = tmp_path / "source.jsonl"
    with source.open("wb") as f:
        for kw in traffic.queries(count):
            f.write(encode(traffic.as_record(kw)) + b"\n")

    def timed_import(path: Path) -> float:
        started = time.perf_counter()
        with path.open("rb") as f:
            report = import_rows(pg, "query", f)
        assert report.inserted == count
        return count / (time.perf_counter() - started)

    fresh = timed_import(source)
    exported = tmp_path / "a.jsonl"
    started = time.perf_counter()
    with exported.open("wb") as f:
        assert export_rows(pg, "query", f) == count
    export_rate = count / (time.perf_counter() - started)
    pg.execute("TRUNCATE query_history")
    again = timed_import(exported)
    with capsys.disabled():
        mb = exported.stat().st_size / 1e6
        print(
            f"\n{count:,} rows, {mb:.0f} MB: export {export_rate:,.0f} rows/s; "
            f"import {fresh:,.0f} rows/s (producer-style lines), {again:,.0f} rows/s (export)"
        )
