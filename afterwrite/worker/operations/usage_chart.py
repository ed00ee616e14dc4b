"""A self-contained HTML page with an inline SVG bar chart of usage rows.

Pure: rows in, a string out; no JavaScript, no external fonts, stylesheets or CDN, so the file
opens offline and can be attached to a ticket. Two panels share the group labels: calls (left)
and p95 latency (right), one horizontal bar per group in each, in the order of the rows.
Every label is HTML-escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from afterwrite.worker.operations.usage_rows import UsageRow

BAR_HEIGHT_PX = 22
BAR_GAP_PX = 6
LABEL_WIDTH_PX = 200
PANEL_WIDTH_PX = 320
PANEL_GAP_PX = 40
TOP_PX = 30
_FILLS = {"calls": "#4878a8", "p95": "#d08040"}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-top: 1.5em; }
td, th { padding: 2px 10px; text-align: right; border-bottom: 1px solid #ddd; }
td:first-child, th:first-child { text-align: left; }
"""


def _label(row: UsageRow) -> str:
    return "(none)" if row.key is None else row.key


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} ms"


def _panel(
    rows: Sequence[UsageRow],
    values: Sequence[float | None],
    x0: int,
    css: str,
    title: str,
    unit: str,
) -> list[str]:
    """One panel; a value of None (no latency recorded) gets no bar and "-", as in the table."""
    top = max((v for v in values if v is not None), default=0.0) or 1.0
    parts = [f'<text x="{x0}" y="{TOP_PX - 12}" font-weight="bold">{escape(title)}</text>']
    for i, (row, value) in enumerate(zip(rows, values, strict=True)):
        y = TOP_PX + i * (BAR_HEIGHT_PX + BAR_GAP_PX)
        if value is None:
            parts.append(f'<text x="{x0 + 4}" y="{y + BAR_HEIGHT_PX - 6}">-</text>')
            continue
        width = round(value / top * (PANEL_WIDTH_PX - 90), 1)
        parts.append(
            f'<rect class="{css}" x="{x0}" y="{y}" width="{width}" height="{BAR_HEIGHT_PX}" '
            f'fill="{_FILLS[css]}">'
            f"<title>{escape(_label(row))}: {value:,.1f}{unit}</title></rect>"
        )
        shown = f"{value:,.1f}" if 0 < value < 10 else f"{value:,.0f}"  # 0.2 ms is not "0 ms"
        parts.append(f'<text x="{x0 + width + 4}" y="{y + BAR_HEIGHT_PX - 6}">{shown}{unit}</text>')
    return parts


def svg_chart(rows: Sequence[UsageRow]) -> str:
    """An ``<svg>`` element: calls and p95 latency ("-" and no bar where unknown) per row."""
    height = TOP_PX + len(rows) * (BAR_HEIGHT_PX + BAR_GAP_PX) + 10
    width = LABEL_WIDTH_PX + 2 * PANEL_WIDTH_PX + PANEL_GAP_PX
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" font-family="sans-serif" font-size="12">'
    ]
    for i, row in enumerate(rows):
        y = TOP_PX + i * (BAR_HEIGHT_PX + BAR_GAP_PX) + BAR_HEIGHT_PX - 6
        parts.append(
            f'<text x="{LABEL_WIDTH_PX - 8}" y="{y}" text-anchor="end">'
            f"{escape(_label(row)[:32])}</text>"
        )
    parts += _panel(rows, [float(r.calls) for r in rows], LABEL_WIDTH_PX, "calls", "calls", "")
    parts += _panel(
        rows,
        [r.p95_latency_ms for r in rows],
        LABEL_WIDTH_PX + PANEL_WIDTH_PX + PANEL_GAP_PX,
        "p95",
        "p95 latency",
        " ms",
    )
    parts.append("</svg>")
    return "\n".join(parts)


def html_page(rows: Sequence[UsageRow], *, title: str) -> str:
    """A complete HTML document: the title, the chart and the figures as a table."""
    head = "".join(
        f"<th>{h}</th>"
        for h in ("group", "calls", "avg latency", "p95 latency", "prompt", "completion", "total")
    )
    body = "\n".join(
        "<tr>"
        f"<td>{escape(_label(r))}</td><td>{r.calls:,}</td>"
        f"<td>{_fmt_ms(r.avg_latency_ms)}</td><td>{_fmt_ms(r.p95_latency_ms)}</td>"
        f"<td>{r.prompt_tokens:,}</td><td>{r.completion_tokens:,}</td><td>{r.total_tokens:,}</td>"
        "</tr>"
        for r in rows
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        f"<h1>{escape(title)}</h1>\n{svg_chart(rows)}\n"
        f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>\n"
        "</body></html>\n"
    )
