"""``afterwrite bench``'s figures: latency percentiles, ratios, targets and the printed table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

TARGET_HOT_P99_RATIO = 1.5
TARGET_DRAIN_RATIO = 0.60
AIM_DRAIN_RATIO = 0.80
TARGET_SPEEDUP = 20.0
TARGET_WORKER_US_PER_ROW = 20.0
"""The drain's worker CPU per row, on every row shape."""


def latency_summary(samples_ns: Sequence[int]) -> dict[str, float]:
    """Nearest-rank percentiles of per-call latencies, in microseconds."""
    ordered = sorted(samples_ns)
    n = len(ordered)
    if n == 0:
        return {}

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1000

    return {
        "p50_us": round(rank(0.50), 1),
        "p90_us": round(rank(0.90), 1),
        "p99_us": round(rank(0.99), 1),
        "p999_us": round(rank(0.999), 1),
        "max_us": round(ordered[-1] / 1000, 1),
        "mean_us": round(sum(ordered) / n / 1000, 1),
    }


def ratio_of(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f} µs"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} rows/s"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}×"


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _ok(flag: bool | None) -> str:
    if flag is None:
        return ""
    return "[green]yes[/green]" if flag else "[red]NO[/red]"


def _vs_raw_rows(
    table: Table,
    labels: tuple[str, str],
    client: dict[str, float],
    raw: dict[str, float],
    ratios: tuple[float | None, float | None],
    *,
    target: str = "",
    met: str = "",
) -> None:
    """The p50 and the p99 row of a client against its raw XADD (target and met on the p99)."""
    p50_label, p99_label = labels
    p50_ratio, p99_ratio = ratios
    table.add_row(p50_label, _us(client["p50_us"]), _us(raw["p50_us"]), _x(p50_ratio), "", "")
    table.add_row(p99_label, _us(client["p99_us"]), _us(raw["p99_us"]), _x(p99_ratio), target, met)


def _drain_rows(table: Table, d: dict[str, Any], cfg: dict[str, Any], shape: str) -> None:
    """Rate against the ceiling, and CPU per row, of one drain (``shape``: "" or "lean ")."""
    c = d["ceiling"]
    size = f", {c['payload_bytes_mean']:,} B" if "payload_bytes_mean" in c else ""
    table.add_row(
        f"drain {d['entries']:,} {shape}backlog{size}, worker ×{cfg['worker_concurrency']} "
        "(first→last commit)",
        _rate(d["rows_per_s"]),
        f"ceiling {_rate(c['rows_per_s'])}",
        f"{(d['ratio_to_ceiling'] or 0) * 100:.0f}%",
        f"≥ {TARGET_DRAIN_RATIO:.0%} (aim {AIM_DRAIN_RATIO:.0%})",
        _ok(d["ok"]),
    )
    if not shape:
        table.add_row(
            "  ceiling: COPY→staging→INSERT ON CONFLICT, 1 process",
            "",
            f"{c['batch_rows']:,}-row batches, {c['seconds']:.1f} s",
            "",
            "",
            "",
        )
    dc, cc = d["cpu"], c["cpu"]
    worker = dc["worker_us_per_row"]
    table.add_row(
        f"  {shape}CPU µs/row: worker / postgres / redis (drain)",
        f"{_num(worker)} / {_num(dc['postgres_us_per_row'])} / {_num(dc['redis_us_per_row'])}",
        f"worker at full speed {_num(dc.get('worker_steady_us_per_row'))}; ceiling: python "
        f"{_num(cc['python_us_per_row'])} / postgres {_num(cc['postgres_us_per_row'])}",
        "",
        f"worker ≤ {TARGET_WORKER_US_PER_ROW:.0f}",
        _ok(None if worker is None else worker <= TARGET_WORKER_US_PER_ROW),
    )
    if shape:
        table.add_row(
            f"  {shape}rows stored exactly once",
            f"{d['rows']:,}",
            f"{d['entries']:,} sent",
            "",
            "all, once",
            _ok(d["exactly_once"]),
        )


def _idle_row(table: Table, idle: dict[str, Any]) -> None:
    pg = idle.get("postgres_pct")
    table.add_row(
        f"idle worker + beat, {idle['seconds']:.0f} s (% of one core)",
        f"{idle['pipeline_pct']:.2f} %",
        f"worker {idle['worker_pct']:.2f} + beat {idle['beat_pct']:.2f}; redis "
        f"{idle['redis_pct']:.2f} % ({idle['redis_commands_per_s']:.1f} cmd/s), postgres "
        f"{'-' if pg is None else f'{pg:.2f} %'}",
        "",
        f"≤ {idle['target_pct']:.0f} %",
        _ok(idle["ok"]),
    )


def print_table(result: dict[str, Any], console: Console) -> None:
    """Print the figures of :func:`run_bench` as one table (measure, value, reference, ratio)."""
    cfg = result["config"]
    table = Table(
        title=f"afterwrite bench ({result['machine']['cpus']} CPUs, "
        f"PostgreSQL {result['machine']['postgres']}, Redis {result['machine']['redis']}, "
        f"{result['total_s']:.0f} s)"
    )
    for column in ("measure", "afterwrite", "reference", "ratio", "target", "met"):
        table.add_column(column, justify="left" if column == "measure" else "right")

    hot = result["hot_path"]
    rq, raw = hot["record_query"], hot["raw_xadd"]
    n = f"{hot['calls']:,} calls, {hot['payload_bytes_mean']:,} B"
    _vs_raw_rows(
        table,
        (f"record_query p50 vs raw XADD ({n})", "record_query p99 vs raw XADD"),
        rq,
        raw,
        (hot["p50_ratio"], hot["p99_ratio"]),
        target=f"≤ {TARGET_HOT_P99_RATIO}×",
        met=_ok(hot["ok"]),
    )
    if hot["not_sent"] or hot["async_not_sent"]:
        table.add_row(
            "[red]record_query calls Redis did not take (sync / async)[/red]",
            f"{hot['not_sent']:,} / {hot['async_not_sent']:,}",
            "0",
            "",
            "0",
            _ok(False),
        )
    arq, araw = hot["async_record_query"], hot["async_raw_xadd"]
    _vs_raw_rows(
        table,
        ("AsyncClient p50 vs async raw XADD", "AsyncClient p99 vs async raw XADD"),
        arq,
        araw,
        (hot["async_p50_ratio"], hot["async_p99_ratio"]),
    )
    base = result.get("baseline")
    if base:
        aa = base["apply_async"]
        table.add_row(
            "Celery apply_async p50 / p99 (per-event baseline)",
            f"{_us(aa.get('p50_us'))} / {_us(aa.get('p99_us'))}",
            f"record_query p99 {_us(rq['p99_us'])}",
            _x(base["apply_async_p99_vs_record_query"]),
            "",
            "",
        )

    d = result["drain"]
    c = d["ceiling"]
    table.add_section()
    _drain_rows(table, d, cfg, "")
    table.add_row(
        "  decode + validate (RowCodec), 1 process",
        f"{c['decode_validate_us_per_row']:.1f} µs/row",
        "",
        "",
        "",
        "",
    )
    lean = result.get("drain_lean")
    if lean:
        _drain_rows(table, lean, cfg, "lean ")
    table.add_row(
        "  machine busy CPUs while draining / load avg at start",
        _num(d.get("machine_busy_cpus"), 2),
        ", ".join(f"{v:.2f}" for v in result["machine"].get("load_avg_at_start") or []),
        "",
        "",
        "",
    )
    table.add_row(
        "  preload (pipelined XADD) / worker start-up",
        f"{d['preload_s']:.1f} s / {d.get('startup_s', 0):.1f} s",
        _rate(d["preload_rows_per_s"]),
        "",
        "",
        "",
    )
    table.add_row(
        "  rows stored exactly once",
        f"{d['rows']:,}",
        f"{d['entries']:,} sent",
        "",
        "all, once",
        _ok(d["exactly_once"]),
    )
    if base:
        table.add_row(
            f"drain vs celery-batches ({base['entries']:,} events, flush_every "
            f"{base['flush_every']:,})",
            _rate(d["rows_per_s"]),
            _rate(base["rows_per_s"]),
            _x(base["afterwrite_speedup"]),
            f"≥ {TARGET_SPEEDUP:.0f}×",
            _ok(base["ok"]),
        )
        table.add_row(
            "  baseline enqueue (apply_async per event, excluded)",
            f"{base['enqueue_s']:.1f} s",
            f"{base['enqueue_per_s'] or 0:,}/s",
            "",
            "",
            "",
        )
        table.add_row(
            "  baseline rows stored exactly once",
            f"{base['rows']:,}",
            f"{base['entries']:,} sent",
            "",
            "all, once",
            _ok(base["exactly_once"]),
        )

    if result.get("idle"):
        table.add_section()
        _idle_row(table, result["idle"])

    rss = d["worker_rss"]
    if rss.get("available"):
        table.add_section()
        table.add_row(
            f"worker RSS start / peak / end ({rss['processes']} processes)",
            f"{rss['start_mb']:,.0f} / {rss['peak_mb']:,.0f} / {rss['end_mb']:,.0f} MiB",
            "",
            "",
            "bounded",
            "",
        )
        bounded = result.get("rss_bounded")
        if bounded and bounded["small_peak_mb"] is not None:
            growth = bounded["peak_growth"]
            table.add_row(
                f"worker RSS peak, {bounded['entries']:,} vs {bounded['small_entries']:,} backlog",
                f"{bounded['peak_mb']:,.0f} MiB",
                f"{bounded['small_peak_mb']:,.0f} MiB",
                _x(growth),
                f"≪ {bounded['backlog_growth']:.0f}×",
                _ok(growth is not None and growth < 1.25),
            )
            small = result["drain_small"]
            table.add_row(
                f"  drain rate at {small['entries']:,} backlog",
                _rate(small["rows_per_s"]),
                "",
                "",
                "",
                _ok(small["exactly_once"]),
            )
    console.print(table)
