"""``afterwrite bench --suite embeddings|index|loadtest|startup|history``: the benchmarks of
embeddings, FAISS indexes, the example web app, start-up costs (client import, CLI) and History
reads on a million stored queries, on the bench's own database and stream prefix."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from afterwrite.core.settings import Settings
from benchmarks.context import BENCH_BROKER_DB, BENCH_DATABASE, open_bench

SUITES = ("pipeline", "embeddings", "index", "loadtest", "startup", "history")


def run_suites(
    settings: Settings, suites: tuple[str, ...], console: Console, *, concurrency: int
) -> dict[str, Any]:
    """Run the non-pipeline ``suites``; print a table for each; return the figures by suite."""
    out: dict[str, Any] = {}
    if "embeddings" in suites:
        from benchmarks.embed import measure_embeddings

        console.print("embeddings: 10,000 texts batched vs one request per text; offline model")
        out["embeddings"] = figures = measure_embeddings()
        console.print(_embeddings_table(figures))
    if any(s in suites for s in ("index", "loadtest", "startup", "history")):
        with open_bench(
            settings,
            console,
            data_dir=None,
            database=BENCH_DATABASE,
            broker_db=BENCH_BROKER_DB,
            concurrency=concurrency,
        ) as b:
            if "index" in suites:
                from benchmarks.index import measure_index

                out["index"] = index = measure_index(settings=b.settings, log=console.print)
                console.print(_index_table(index))
                console.print(_filtered_table(index))
            if "loadtest" in suites:
                from benchmarks.loadtest import run_loadtest

                out["loadtest"] = run_loadtest(b.settings, console=console)
            if "startup" in suites:
                from benchmarks.context import worker_env
                from benchmarks.startup import measure_startup

                console.print("startup: median of 5 fresh interpreters per command")
                out["startup"] = startup = measure_startup(worker_env(b.settings))
                console.print(_startup_table(startup))
            if "history" in suites:
                from benchmarks.history import measure_history

                history = measure_history(b.settings.require_database_url(), log=console.print)
                out["history"] = history
                console.print(_history_table(history))
    return out


def _embeddings_table(f: dict[str, Any]) -> Table:
    t = Table(title=f"embeddings: {f['n_texts']:,} texts ({f['model']})")
    for col in ("path", "requests", "wall time", "texts/s"):
        t.add_column(col, justify="left" if col == "path" else "right")
    for name in ("batched", "naive"):
        r = f[name]
        t.add_row(name, f"{r['requests']:,}", f"{r['wall_s']:.1f} s", f"{r['texts_per_s']:,}")
    t.add_row("fewer requests", f"{f['request_reduction']:,}×", "", "")
    for model, local in (f.get("local") or {}).items():
        t.add_row(
            f"offline: {model}",
            "",
            f"load {local.get('load_s', 0):.2f} s",
            f"{local.get('texts_per_s', 0):,}",
        )
    return t


def _index_table(f: dict[str, Any]) -> Table:
    t = Table(title=f"index rebuild and search, dimension {f['dim']}")
    for col in ("vectors", "read", "build", "write", "total", "index", "recall@10", "reload"):
        t.add_column(col, justify="right")
    for n, r in f["sizes"].items():
        timings = r.get("timings", {})
        t.add_row(
            f"{int(n):,}",
            f"{timings.get('read_s', 0):.1f} s",
            f"{timings.get('build_s', 0):.1f} s",
            f"{timings.get('write_s', 0):.1f} s",
            f"{r.get('rebuild_total_s', 0):.1f} s",
            str(r.get("index_type", "")),
            f"{r.get('recall_at_10') or 0:.3f}",
            f"{r.get('reader_load_s', 0):.2f} s",
        )
    return t


def _filtered_table(f: dict[str, Any]) -> Table:
    t = Table(title="filtered search, k=10 (target at 1M vectors, 1 % filter: p99 ≤ 20 ms)")
    for col in ("vectors", "filter", "path", "p50", "p99", "CPU/search", "CPU p99"):
        t.add_column(col, justify="right")
    for n, r in f["sizes"].items():
        for name, m in r.get("filtered_search", {}).items():
            t.add_row(
                f"{int(n):,}",
                name,
                m["path"],
                f"{m['p50_ms']:.2f} ms",
                f"{m['p99_ms']:.2f} ms",
                f"{m['cpu_ms_per_search']:.2f} ms",
                f"{m['cpu_p99_ms']:.2f} ms",
            )
        search = r.get("search", {})
        unfiltered = next((v for k, v in search.items() if k.startswith("reader")), None)
        if unfiltered:
            t.add_row(
                f"{int(n):,}", "none", "", f"{unfiltered['p50_ms']:.2f} ms",
                f"{unfiltered['p99_ms']:.2f} ms", f"{unfiltered['cpu_ms_per_search']:.2f} ms",
                f"{unfiltered['cpu_p99_ms']:.2f} ms",
            )  # fmt: skip
    return t


def _startup_table(f: dict[str, Any]) -> Table:
    t = Table(title=f"start-up, median of {f['runs']} runs (python alone {f['python_s']:.3f} s)")
    for col in ("command", "wall time", "target"):
        t.add_column(col, justify="left" if col == "command" else "right")
    target = f["targets"]
    t.add_row('python -c "import redis"', f"{f['import_redis_s']:.3f} s", "reference")
    t.add_row(
        'python -c "import afterwrite; afterwrite.Client"',
        f"{f['import_client_s']:.3f} s ({f['client_import_vs_redis']:.2f}×)",
        f"≤ {target['client_import_vs_redis']:.0f}× import redis",
    )
    t.add_row("afterwrite --help", f"{f['help_s']:.3f} s", f"≤ {target['help_s']} s")
    t.add_row("afterwrite status (empty)", f"{f['status_s']:.3f} s", f"≤ {target['status_s']} s")
    return t


def _history_table(f: dict[str, Any]) -> Table:
    fill = f["fill"]
    t = Table(
        title=f"History reads on {f['rows']:,} stored queries ({f['table_mb']:,} MB with indexes; "
        f"filled in {fill['insert_s']:.0f} s + indexes {fill['index_s']:.0f} s)"
    )
    for col in ("read", "p50", "p95", "p99", "max", "CPU pg+py", "records", "target p99"):
        t.add_column(col, justify="left" if col == "read" else "right")
    targets = f["targets_ms"]
    for name, r in f["reads"].items():
        target = next((f"≤ {v:.0f} ms" for k, v in targets.items() if name.startswith(k)), "")
        t.add_row(
            name,
            f"{r['p50_ms']:.2f} ms",
            f"{r['p95_ms']:.2f} ms",
            f"{r['p99_ms']:.2f} ms",
            f"{r['max_ms']:.1f} ms",
            "-"
            if r["server_cpu_ms"] is None
            else f"{r['server_cpu_ms']:.2f}+{r['client_cpu_ms']:.2f} ms",
            f"{r['avg_records']:g}",
            target,
        )
    return t
