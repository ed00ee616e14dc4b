"""PostgreSQL CPU per inserted ``query`` row with responses indexed for full text or not
(``AFTERWRITE_SEARCH_RESPONSES``), on both of the drain bench's row shapes.

Rows go through the drain's own statements (``kind_sql``: COPY into staging, INSERT … ON
CONFLICT) in batches of 1,000; the cost is the backend's CPU time from ``/proc`` (robust to a
busy machine, unlike wall time). Runs alternate off and on, three rounds each.

    python -m benchmarks.response_search postgresql://postgres@127.0.0.1:5432/scratch [rows]

The database must be migrated (``afterwrite migrate``) and on this machine; its
``query_history`` is truncated.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import psycopg

from afterwrite.core import wire
from afterwrite.demo import traffic
from afterwrite.models.registry import kinds
from afterwrite.worker.ingest.rows import RowCodec
from afterwrite.worker.ingest.sql import kind_sql
from benchmarks.drain import SHAPES, lean

DERIVED = ("response_search_vector",)


def backend_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rows_of(shape: str, count: int, codec: RowCodec) -> list[tuple[Any, ...]]:
    return [
        codec.row(wire.decode(wire.encode(traffic.as_record(lean(kw) if shape == "lean" else kw))))
        for kw in traffic.queries(count, seed=7)
    ]


def measure(url: str, count: int, rounds: int = 3) -> dict[str, dict[str, list[float]]]:
    """``{shape: {"off": [µs/row per round], "on": [...]}}``."""
    kind = kinds.get("query")
    codec = RowCodec(kind.table)
    out: dict[str, dict[str, list[float]]] = {}
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        pid = int(row[0])
        for shape in SHAPES:
            rows = rows_of(shape, count, codec)
            out[shape] = {"off": [], "on": []}
            for _ in range(rounds):
                for label in ("off", "on"):
                    q = kind_sql(
                        kind.table, codec.columns, derived=DERIVED if label == "on" else ()
                    )
                    conn.execute("TRUNCATE query_history")
                    conn.execute(q.create_staging)
                    conn.commit()
                    before = backend_cpu_s(pid)
                    for i in range(0, count, 1000):
                        with conn.cursor() as cur:
                            with cur.copy(q.copy) as copy:
                                for r in rows[i : i + 1000]:
                                    copy.write_row(r)
                            cur.execute(q.insert)
                        conn.commit()
                    used = backend_cpu_s(pid) - before
                    out[shape][label].append(round(used / count * 1e6, 1))
            conn.execute("TRUNCATE query_history")
            conn.commit()
    return out


def main() -> None:
    url = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
    for shape, runs in measure(url, count).items():
        print(f"{shape:9} PostgreSQL CPU µs/row  off {runs['off']}  on {runs['on']}")


if __name__ == "__main__":
    main()
