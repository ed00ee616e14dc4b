"""``afterwrite bench --suite history``: History reads on 1,000,000 stored queries.

The rows are made by PostgreSQL itself (``generate_series``), not through the pipeline: 90 days
of traffic in time order, 5,000 users with a skewed share each (the busiest has ~1.4 % of all
rows), sessions of 8 turns, and text drawn from a 20,000-word vocabulary with a Zipf-like
distribution (see ``_WORDS``), so search terms are as common or rare as words in real
questions. Secondary indexes are dropped during the fill and built after it (as a bulk
load would); ``search_vector`` is generated per row.

Each read is timed end to end through ``History`` (the SQL round trip and building the records)
on random users, sessions and search terms; p50/p95/p99 over ``calls`` calls each.
"""

from __future__ import annotations

import random
import re
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from afterwrite.history import History
from benchmarks.procfs import process_cpu_s

ROWS = 1_000_000
END = datetime(2026, 11, 1, tzinfo=UTC)
TARGETS_MS = {"recent": 20.0, "conversation": 20.0, "search_text": 100.0}

_SECONDARY = (
    "ix_query_history_user_id_created_at",
    "ix_query_history_created_at",
    "ix_query_history_mode_created_at",
    "ix_query_history_model_ids",
    "ix_query_history_session_id_created_at",
    "ix_query_history_search_vector",
    "ix_query_history_response_search_vector",
)

_WORDS = "'w' || (floor(50 * power(401, random())) - 50)::int"
"""A content word: ``w0`` … ``w19999``, word n with probability ~1/(n + 50): Zipf's law with
the head cut off, as the English configuration drops the stop words that would head it. The
commonest word is in ~5 % of rows, the hundredth in ~1 %."""

_FILL = f"""
INSERT INTO query_history (id, created_at, user_id, session_id, query, response, mode,
                           model_ids, response_time_ms, prompt_tokens, completion_tokens)
SELECT gen_random_uuid(),
       %(end)s - (%(rows)s - g) * interval '7776 milliseconds',
       'user-' || floor(random() ^ 2 * 5000)::int,
       's-' || (g / 8),
       (ARRAY['how do I', 'why does', 'can you explain', 'what is the best way to',
              'help me with'])[1 + g %% 5]
         || ' ' || {_WORDS} || ' ' || {_WORDS} || ' ' || {_WORDS} || ' ' || {_WORDS} || '?',
       'You can ' || {_WORDS} || ' the ' || {_WORDS} || ' with ' || {_WORDS} || ' and '
         || {_WORDS} || '; see ' || {_WORDS} || ' ' || {_WORDS} || ' ' || {_WORDS} || ' '
         || {_WORDS} || ' ' || {_WORDS} || ' ' || {_WORDS} || ' for ' || {_WORDS} || '.',
       CASE WHEN m < 0.60 THEN 'chat' WHEN m < 0.85 THEN 'rag' WHEN m < 0.96 THEN 'agent'
            ELSE 'compare' END,
       CASE WHEN r < 0.35 THEN '["gpt-4o"]'::jsonb WHEN r < 0.60 THEN '["claude-3-5-sonnet"]'
            WHEN r < 0.99 THEN '["llama-3.1-70b"]' ELSE '["command-r"]' END,
       exp(5.5 + 1.2 * random()),
       50 + floor(random() * 2000)::int,
       10 + floor(random() * 800)::int
FROM (SELECT g, random() AS m, random() AS r FROM generate_series(1, %(rows)s) AS g) AS s
"""


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return {
        "p50_ms": round(statistics.median(samples_ms), 2),
        "p95_ms": round(q[94], 2),
        "p99_ms": round(q[98], 2),
        "max_ms": round(max(samples_ms), 2),
    }


def _timed(calls: int, read: Callable[[int], int], backend_pid: int | None) -> dict[str, Any]:
    """``read(i)`` (returns how many records it got) ``calls`` times, after 20 warm-up calls.

    Besides wall times, the CPU the reads cost, which a busy machine does not inflate: this
    process's, and the PostgreSQL backend's (``backend_pid``, from /proc; averages, as the
    kernel counts in clock ticks)."""
    for i in range(20):
        read(i)
    samples, found = [], 0
    server0 = process_cpu_s(backend_pid) if backend_pid else None
    client0 = time.process_time()
    for i in range(calls):
        started = time.perf_counter()
        found += read(i)
        samples.append((time.perf_counter() - started) * 1000)
    client_ms = (time.process_time() - client0) * 1000 / calls
    server1 = process_cpu_s(backend_pid) if backend_pid else None
    server_ms = None
    if server0 is not None and server1 is not None:
        server_ms = round((server1 - server0) * 1000 / calls, 2)
    return {
        **_percentiles(samples),
        "calls": calls,
        "avg_records": round(found / calls, 1),
        "client_cpu_ms": round(client_ms, 2),
        "server_cpu_ms": server_ms,
    }


def _fill(conn: psycopg.Connection[Any], rows: int, log: Callable[[str], None]) -> dict[str, float]:
    started = time.perf_counter()
    for name in _SECONDARY:
        conn.execute(f'DROP INDEX "{name}"')
    conn.execute("SELECT setseed(0.16)")
    conn.execute(_FILL, {"end": END, "rows": rows})
    filled = time.perf_counter()
    log(f"  {rows:,} rows inserted in {filled - started:.0f} s; building indexes")
    from afterwrite.models.registry import kinds

    for index in kinds.get("query").table.indexes:
        conn.execute(_create_index_sql(index))
    indexed = time.perf_counter()
    conn.execute("VACUUM ANALYZE query_history")
    done = time.perf_counter()
    return {
        "insert_s": round(filled - started, 1),
        "index_s": round(indexed - filled, 1),
        "vacuum_analyze_s": round(done - indexed, 1),
    }


def _create_index_sql(index: Any) -> str:
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex

    return str(CreateIndex(index).compile(dialect=postgresql.dialect()))  # type: ignore[no-untyped-call]


def measure_history(
    database_url: str,
    *,
    rows: int = ROWS,
    calls: int = 500,
    log: Callable[[str], None] = print,
    responses: bool = True,
) -> dict[str, Any]:
    """Fill ``query_history`` (which must be empty and migrated) and time each read; with
    ``responses``, then index every response's words and time the full-text reads again."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        log(f"history: filling query_history with {rows:,} rows (generate_series)")
        fill = _fill(conn, rows, log)
        sizes = conn.execute(
            "SELECT pg_total_relation_size('query_history'), "
            "pg_relation_size('ix_query_history_search_vector')"
        ).fetchone()
        assert sizes is not None
        users = [r[0] for r in conn.execute("SELECT DISTINCT user_id FROM query_history")]
        sample = conn.execute(
            "SELECT user_id, session_id, query, id::text FROM query_history "
            "TABLESAMPLE SYSTEM (1) LIMIT 5000"
        ).fetchall()
    rng = random.Random(16)
    # a user of a random record: busy users come up as often as they ask
    picks = [rng.choice(sample) for _ in range(calls + 20)]
    # the vocabulary's words of the question (not the phrase around them: "what", "way")
    words = [re.findall(r"\bw\d+\b", p[2]) for p in picks]
    heaviest = max(users, key=lambda u: sum(1 for p in sample if p[0] == u))
    out: dict[str, Any] = {"rows": rows, "fill": fill}
    out["table_mb"] = round(sizes[0] / 2**20)
    out["search_index_mb"] = round(sizes[1] / 2**20)
    with History(database_url) as h:

        def walk(i: int) -> int:  # a page deep in a heavy user's history, by cursor
            page = h.recent(heaviest, limit=50, cursor=cursors[i % len(cursors)])
            return len(page.items)

        cursors: list[str | None] = [None]
        page = h.recent(heaviest, limit=50)
        while page.next_cursor is not None and len(cursors) < 200:
            cursors.append(page.next_cursor)
            page = h.recent(heaviest, limit=50, cursor=page.next_cursor)
        reads: dict[str, Callable[[int], int]] = {
            "recent (a user's first page of 50)": lambda i: len(
                h.recent(picks[i][0], limit=50).items
            ),
            "recent (the busiest user, pages 1-200)": walk,
            "conversation (a session)": lambda i: len(h.conversation(picks[i][1]).items),
            "get (one record)": lambda i: 0 if h.get(picks[i][3]) is None else 1,
            "search_text (two of a user's words, that user)": lambda i: len(
                h.search_text(" ".join(words[i][:2]), user_id=picks[i][0])
            ),
            "search_text (two words of a stored question, everyone)": lambda i: len(
                h.search_text(" ".join(words[i][:2]))
            ),
            "search_text (one word of a stored question, everyone)": lambda i: len(
                h.search_text(words[i][0])
            ),
        }
        # One thread, so every read reuses the same pooled connection (the last one returned):
        # its backend's CPU is the reads'.
        pid_rows = h._pool.fetch("SELECT pg_backend_pid()", {})
        backend_pid = int(pid_rows[0][0]) if Path(f"/proc/{pid_rows[0][0]}").exists() else None
        out["reads"] = {}
        for name, read in reads.items():
            log(f"  timing {name}")
            out["reads"][name] = _timed(calls, read, backend_pid)
        if responses:
            out["responses_fill_s"] = _index_responses(database_url, log)
            for name, read in reads.items():
                if name.startswith("search_text"):
                    log(f"  timing {name}, responses indexed")
                    out["reads"][f"{name}, responses indexed"] = _timed(calls, read, backend_pid)
    out["targets_ms"] = TARGETS_MS
    return out


def _index_responses(database_url: str, log: Callable[[str], None]) -> float:
    """Every row's response words, as if AFTERWRITE_SEARCH_RESPONSES had been on from the start
    (one UPDATE with the index dropped, then the index rebuilt); the seconds it took."""
    from afterwrite.models.query_history import RESPONSE_VECTOR_SQL
    from afterwrite.models.registry import kinds

    log("  indexing every response's words (AFTERWRITE_SEARCH_RESPONSES from the start)")
    started = time.perf_counter()
    name = "ix_query_history_response_search_vector"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP INDEX "{name}"')
        conn.execute(f"UPDATE query_history SET response_search_vector = {RESPONSE_VECTOR_SQL}")
        (index,) = [i for i in kinds.get("query").table.indexes if i.name == name]
        conn.execute(_create_index_sql(index))
        conn.execute("VACUUM ANALYZE query_history")
    return round(time.perf_counter() - started, 1)
