"""Usage statistics (afterwrite.worker.operations.usage, ``afterwrite stats``) against the real
PostgreSQL.

Exact figures on a small hand-made table, the CLI's JSON and HTML output, and (slow, ~30 s)
the query plans of the common questions on a million-row table.
"""

from __future__ import annotations

import json
import re
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql
from psycopg.types.json import Jsonb

from afterwrite.cli.stats import stats_cmd
from afterwrite.worker.operations.usage import usage, usage_params, usage_query
from afterwrite.worker.operations.usage_rows import GroupBy, UsageRow

T = datetime(2026, 11, 1, tzinfo=UTC)
SINCE = T - timedelta(days=2)
UNTIL = T


@dataclass(frozen=True)
class Req:
    at: datetime
    user: str | None
    mode: str | None
    models: tuple[str, ...]
    latency_ms: float | None
    prompt: int | None
    completion: int | None


DATA = [
    Req(SINCE, "alice", "chat", ("gpt-4o",), 100.0, 10, 5),  # exactly `since`: counted
    Req(SINCE + timedelta(hours=2), "alice", "chat", ("gpt-4o",), 200.0, 20, 10),
    Req(SINCE + timedelta(hours=3), "bob", "rag", ("claude",), 300.0, 30, 15),
    Req(SINCE + timedelta(hours=23, minutes=59), "bob", "rag", ("claude",), 350.0, 35, 0),
    Req(T - timedelta(days=1), "bob", "compare", ("gpt-4o", "claude"), 1000.0, 40, 20),
    Req(T - timedelta(hours=20), "carol", "chat", ("gpt-4o",), 50.0, None, None),
    Req(T - timedelta(hours=19), "carol", "agent", ("llama",), None, 5, 5),
    Req(T - timedelta(hours=12), None, None, (), 70.0, 1, 1),
    Req(T - timedelta(hours=1), "alice", "chat", ("gpt-4o",), 400.0, 100, 50),
    Req(T - timedelta(microseconds=1), "alice", "chat", ("gpt-4o",), 125.0, 2, 3),
    Req(T, "alice", "chat", ("gpt-4o",), 9999.0, 999, 999),  # exactly `until`: not counted
    Req(SINCE - timedelta(microseconds=1), "bob", "chat", ("claude",), 9999.0, 999, 999),
]


def _insert(pg: psycopg.Connection[Any], data: list[Req]) -> None:
    with pg.cursor() as cur:
        cur.executemany(
            "INSERT INTO query_history (id, created_at, user_id, query, mode, model_ids,"
            " response_time_ms, prompt_tokens, completion_tokens)"
            " VALUES (%s, %s, %s, 'q', %s, %s, %s, %s, %s)",
            [
                (
                    uuid.uuid4(),
                    r.at,
                    r.user,
                    r.mode,
                    Jsonb(list(r.models)),
                    r.latency_ms,
                    r.prompt,
                    r.completion,
                )
                for r in data
            ],
        )


def _p95(values: list[float]) -> float | None:
    """Linear interpolation between closest ranks, as percentile_cont."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=20, method="inclusive")[18]


KEYS: dict[str, Callable[[Req], list[str | None]]] = {
    "model": lambda r: list(r.models),
    "user": lambda r: [r.user],
    "mode": lambda r: [r.mode],
    "day": lambda r: [r.at.strftime("%Y-%m-%d")],
}


def _expected(group_by: str, since: datetime = SINCE, until: datetime = UNTIL) -> list[UsageRow]:
    """What usage() must return, computed in Python from DATA."""
    groups: dict[str | None, list[Req]] = defaultdict(list)
    for r in DATA:
        if since <= r.at < until:
            for key in KEYS[group_by](r):
                groups[key].append(r)
    rows = []
    for key, reqs in groups.items():
        latencies = [r.latency_ms for r in reqs if r.latency_ms is not None]
        prompt = sum(r.prompt or 0 for r in reqs)
        completion = sum(r.completion or 0 for r in reqs)
        rows.append(
            UsageRow(
                key=key,
                calls=len(reqs),
                avg_latency_ms=statistics.fmean(latencies) if latencies else None,
                p95_latency_ms=_p95(latencies),
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=prompt + completion,
            )
        )
    if group_by == "day":
        return sorted(rows, key=lambda r: r.key or "")
    return sorted(rows, key=lambda r: (-r.calls, r.key is None, r.key or ""))


def _plain(row: UsageRow) -> tuple[Any, ...]:
    return tuple(row.as_dict().values())


def _approx(rows: list[UsageRow]) -> list[tuple[Any, ...]]:
    """Rows as tuples, latencies compared to within pytest's default tolerance."""
    return [
        (
            r.key,
            r.calls,
            None if r.avg_latency_ms is None else pytest.approx(r.avg_latency_ms),
            None if r.p95_latency_ms is None else pytest.approx(r.p95_latency_ms),
            r.prompt_tokens,
            r.completion_tokens,
            r.total_tokens,
        )
        for r in rows
    ]


@pytest.mark.parametrize("group_by", ["model", "user", "mode", "day"])
def test_usage_matches_figures_computed_in_python(
    pg: psycopg.Connection[Any], group_by: GroupBy
) -> None:
    _insert(pg, DATA)
    got = usage(pg, since=SINCE, until=UNTIL, group_by=group_by)
    assert [_plain(r) for r in got] == _approx(_expected(group_by))


def test_usage_per_model_counts_a_compared_request_for_each_model(
    pg: psycopg.Connection[Any],
) -> None:
    _insert(pg, DATA)
    rows = {r.key: r for r in usage(pg, since=SINCE, until=UNTIL, group_by="model")}
    assert list(rows) == ["gpt-4o", "claude", "llama"]  # most calls first; [] has no model
    gpt = rows["gpt-4o"]
    # the `since` row, +2h, the compare row, carol's, -1h and the last microsecond
    assert gpt.calls == 6
    assert gpt.avg_latency_ms == pytest.approx((100 + 200 + 1000 + 50 + 400 + 125) / 6)
    # sorted 50 100 125 200 400 1000: rank 0.95 * 5 = 4.75 → 400 + 0.75 * 600
    assert gpt.p95_latency_ms == pytest.approx(850.0)
    assert (gpt.prompt_tokens, gpt.completion_tokens, gpt.total_tokens) == (172, 88, 260)
    claude = rows["claude"]
    assert (claude.calls, claude.prompt_tokens, claude.completion_tokens) == (3, 105, 35)
    llama = rows["llama"]
    assert (llama.calls, llama.avg_latency_ms, llama.p95_latency_ms) == (1, None, None)


def test_usage_window_is_inclusive_start_exclusive_end(pg: psycopg.Connection[Any]) -> None:
    _insert(pg, DATA)
    days = usage(pg, since=SINCE, until=UNTIL, group_by="day")
    assert [(d.key, d.calls) for d in days] == [("2026-10-30", 4), ("2026-10-31", 6)]
    # two adjacent windows add up to the whole: nothing counted twice or lost
    middle = T - timedelta(days=1)
    first = usage(pg, since=SINCE, until=middle, group_by="mode")
    second = usage(pg, since=middle, until=UNTIL, group_by="mode")
    assert sum(r.calls for r in first + second) == 10
    assert sum(r.calls for r in first) == 4


def test_usage_filters_by_user_and_model(pg: psycopg.Connection[Any]) -> None:
    _insert(pg, DATA)
    alice = usage(pg, since=SINCE, until=UNTIL, group_by="model", user_id="alice")
    assert [(r.key, r.calls, r.prompt_tokens) for r in alice] == [("gpt-4o", 4, 132)]
    # grouped by model with a model filter: only that model, not the ones it was compared with
    claude = usage(pg, since=SINCE, until=UNTIL, group_by="model", model="claude")
    assert [(r.key, r.calls) for r in claude] == [("claude", 3)]
    claude_users = usage(pg, since=SINCE, until=UNTIL, group_by="user", model="claude")
    assert [(r.key, r.calls) for r in claude_users] == [("bob", 3)]
    both = usage(pg, since=SINCE, until=UNTIL, group_by="mode", user_id="bob", model="gpt-4o")
    assert [(r.key, r.calls) for r in both] == [("compare", 1)]
    assert usage(pg, since=SINCE, until=UNTIL, group_by="user", model="no-such") == []


def test_usage_limit_keeps_the_top_groups_and_the_latest_days(pg: psycopg.Connection[Any]) -> None:
    _insert(pg, DATA)
    top = usage(pg, since=SINCE, until=UNTIL, group_by="user", limit=2)
    assert [(r.key, r.calls) for r in top] == [("alice", 4), ("bob", 3)]
    last = usage(pg, since=SINCE, until=UNTIL, group_by="day", limit=1)
    assert [r.key for r in last] == ["2026-10-31"]


def test_usage_rejects_bad_arguments(pg: psycopg.Connection[Any]) -> None:
    with pytest.raises(ValueError, match="group_by"):
        usage(pg, since=SINCE, until=UNTIL, group_by="session")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timezone"):
        usage(pg, since=SINCE.replace(tzinfo=None), until=UNTIL, group_by="day")
    with pytest.raises(ValueError, match="limit"):
        usage(pg, since=SINCE, until=UNTIL, group_by="day", limit=0)


# --- the command ------------------------------------------------------------------------------
WINDOW = ["--since", SINCE.isoformat(), "--until", UNTIL.isoformat()]


def test_cli_json_output(pg: psycopg.Connection[Any], cli_env: None) -> None:
    _insert(pg, DATA)
    result = CliRunner().invoke(stats_cmd, [*WINDOW, "--by", "user", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["group_by"] == "user"
    assert report["since"] == SINCE.isoformat()
    assert report["until"] == UNTIL.isoformat()
    got = [_plain(UsageRow(**row)) for row in report["rows"]]
    assert got == _approx(_expected("user"))


def test_cli_human_table_and_html_chart(
    pg: psycopg.Connection[Any], cli_env: None, tmp_path: Path
) -> None:
    _insert(pg, DATA)
    page = tmp_path / "usage.html"
    result = CliRunner().invoke(stats_cmd, [*WINDOW, "--by", "model", "--html", str(page)])
    assert result.exit_code == 0, result.output
    assert "gpt-4o" in result.output
    assert "850.0" in result.output  # gpt-4o's p95
    html = page.read_text(encoding="utf-8")
    assert html.count("<svg") == 1
    assert html.count('<rect class="calls"') == 3  # one bar per model
    assert html.count('<rect class="p95"') == 2  # llama has no latency: "-", no bar
    assert "<script" not in html
    assert not re.search(r'(src|href)="', html)  # nothing fetched


def test_cli_prints_hostile_user_ids_as_text(
    pg: psycopg.Connection[Any], cli_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # no wrapping
    users = ["[/boom]", "[link=https://e.x]u[/link]", "\x1b[31mred\x1b]8;;u\x07"]
    _insert(pg, [Req(T - timedelta(hours=1), u, "chat", ("m",), 1.0, 1, 1) for u in users])
    result = CliRunner().invoke(stats_cmd, [*WINDOW, "--by", "user"])
    assert result.exit_code == 0, (result.output, result.exception)  # "[/boom]" crashed it
    assert "[/boom]" in result.output
    assert "[link=https://e.x]u[/link]" in result.output
    assert "\\x1b[31mred" in result.output
    assert "\x1b" not in result.output
    assert "\x07" not in result.output


def test_cli_rejects_a_bad_time_and_an_empty_window(cli_env: None) -> None:
    bad = CliRunner().invoke(stats_cmd, ["--since", "last tuesday"])
    assert bad.exit_code == 2
    assert "neither an ISO time nor an age" in bad.output
    empty = CliRunner().invoke(stats_cmd, ["--since", "1d", "--until", "2d"])
    assert empty.exit_code == 2
    assert "empty window" in empty.output


# --- plans on a realistic table (slow: ~30 s) -------------------------------------------------
EXPLAIN_ROWS = 1_000_000
"""90 days of traffic, one request every 7.8 s, ending at T; 5,000 users (skewed), 8 models
(35 % … 1 %), 4 % compare requests answered by two models. Rows arrive in time order, as a
write-behind worker writes them."""

_FILL = """
INSERT INTO query_history (id, created_at, user_id, session_id, query, mode, model_ids,
                           response_time_ms, prompt_tokens, completion_tokens)
SELECT gen_random_uuid(),
       %(end)s - (%(rows)s - g) * interval '7776 milliseconds',
       'user-' || floor(random() ^ 2 * 5000)::int,
       's-' || (g / 8),
       'q' || g,
       CASE WHEN m < 0.60 THEN 'chat' WHEN m < 0.85 THEN 'rag' WHEN m < 0.96 THEN 'agent'
            ELSE 'compare' END,
       CASE WHEN m >= 0.96 THEN '["gpt-4o", "claude-3-5-sonnet"]'::jsonb
            WHEN r < 0.35 THEN '["gpt-4o"]' WHEN r < 0.60 THEN '["claude-3-5-sonnet"]'
            WHEN r < 0.75 THEN '["llama-3.1-70b"]' WHEN r < 0.87 THEN '["gpt-4o-mini"]'
            WHEN r < 0.93 THEN '["mistral-large"]' WHEN r < 0.97 THEN '["gemini-1.5-pro"]'
            WHEN r < 0.99 THEN '["qwen2.5-72b"]' ELSE '["command-r"]' END,
       exp(5.5 + 1.2 * random()),
       50 + floor(random() * 2000)::int,
       10 + floor(random() * 800)::int
FROM (SELECT g, random() AS m, random() AS r FROM generate_series(1, %(rows)s) AS g) AS s
"""

DAY = timedelta(days=1)
COMMON: dict[str, tuple[GroupBy, dict[str, Any], str | tuple[str, ...]]] = {
    # name: (group_by, window and filters, the index the plan must use, or the ones it may)
    "1 day per model": ("model", {"since": T - DAY}, "ix_query_history_created_at"),
    "1 day per user": ("user", {"since": T - DAY}, "ix_query_history_created_at"),
    "1 day per mode": ("mode", {"since": T - DAY}, "ix_query_history_created_at"),
    "one user, 7 days, per day": (
        "day",
        {"since": T - 7 * DAY, "user_id": "user-42"},
        "ix_query_history_user_id_created_at",
    ),
    "one user, 7 days, per model": (
        "model",
        {"since": T - 7 * DAY, "user_id": "user-42"},
        "ix_query_history_user_id_created_at",
    ),
    "one model (1 %), 90 days, per day": (
        "day",
        {"since": T - 90 * DAY, "model": "command-r"},
        "ix_query_history_model_ids",
    ),
    # A third of the table by time or 1 % of it by model cost about the same: which one the
    # planner takes follows ANALYZE's random sample (seen both ways on the same data).
    "one model (1 %), 30 days, per user": (
        "user",
        {"since": T - 30 * DAY, "model": "command-r"},
        ("ix_query_history_model_ids", "ix_query_history_created_at"),
    ),
}


def _scans(node: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
    """(node type, relation, index) of every scan in a plan tree."""
    found = []
    if "Relation Name" in node or "Index Name" in node:
        found.append((node["Node Type"], node.get("Relation Name"), node.get("Index Name")))
    for child in node.get("Plans", []):
        found += _scans(child)
    return found


@pytest.mark.timeout(240)
def test_slow_common_queries_use_an_index_on_a_million_rows(pg: psycopg.Connection[Any]) -> None:
    """SLOW (~30 s): fills query_history with EXPLAIN_ROWS rows server-side."""
    pg.execute("SELECT setseed(0.42)")
    pg.execute(_FILL, {"end": T, "rows": EXPLAIN_ROWS})
    # VACUUM, as autovacuum would after a bulk load: it also merges the GIN pending list, which
    # otherwise makes containment look (and be) expensive.
    pg.execute("VACUUM ANALYZE query_history")
    timings = {}
    for name, (group_by, args, index) in COMMON.items():
        user_id, model = args.get("user_id"), args.get("model")
        query = usage_query(group_by, user_id=user_id, model=model)
        params = usage_params(until=T, limit=20, **args)
        explain = pg.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params).fetchone()
        assert explain is not None
        scans = _scans(explain[0][0]["Plan"])
        on_table = [s for s in scans if s[1] == "query_history" or s[2] is not None]
        assert not [s for s in on_table if s[0] == "Seq Scan"], (name, scans)
        allowed = {index} if isinstance(index, str) else set(index)
        assert allowed & {s[2] for s in scans}, (name, scans)
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            usage(pg, until=T, group_by=group_by, **args)
            runs.append((time.perf_counter() - started) * 1000)
        timings[name] = statistics.median(runs)
    print("\nstats query latency on", f"{EXPLAIN_ROWS:,} rows (median of 3):")
    for name, ms in timings.items():
        print(f"  {name:40s} {ms:8.1f} ms  ({COMMON[name][2]})")
