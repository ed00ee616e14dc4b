"""The HTML chart of ``afterwrite stats --html`` (pure: rows in, a page out)."""

from __future__ import annotations

import re

from afterwrite.worker.operations.usage_chart import html_page, svg_chart
from afterwrite.worker.operations.usage_rows import UsageRow


def _row(key: str | None, calls: int, p95: float | None) -> UsageRow:
    return UsageRow(key, calls, p95, p95, 10, 5, 15)


ROWS = [_row("gpt-4o", 200, 900.0), _row("claude", 100, 450.0), _row(None, 1, None)]


def test_one_bar_per_group_in_each_panel_scaled_to_the_largest() -> None:
    svg = svg_chart(ROWS)
    calls = re.findall(r'<rect class="calls" [^>]*width="([\d.]+)"', svg)
    p95 = re.findall(r'<rect class="p95" [^>]*width="([\d.]+)"', svg)
    assert len(calls) == 3
    assert len(p95) == 2  # the group with no latency recorded has no bar
    assert float(calls[0]) == 2 * float(calls[1]) > 0
    assert float(p95[0]) == 2 * float(p95[1])
    assert "(none)" in svg


def test_unknown_latency_reads_as_in_the_table_not_as_zero() -> None:
    page = html_page([_row("known", 5, 0.2), _row("unknown", 1, None)], title="t")
    svg = svg_chart([_row("known", 5, 0.2), _row("unknown", 1, None)])
    labels = re.findall(r"<text [^>]*>([^<]*)</text>", svg)
    assert "0.2 ms" in labels  # a real 0.2 ms p95 is drawn and labelled as such
    assert [t for t in labels if t.endswith(" ms")] == ["0.2 ms"]  # ...the unknown one is not
    assert re.search(r">-</text>", svg)
    assert "<td>-</td>" in page


def test_page_is_self_contained_and_escapes_labels() -> None:
    page = html_page([_row("<script>alert(1)</script>", 3, 1.0)], title="usage & more")
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page
    assert "&lt;script&gt;" in page
    assert "usage &amp; more" in page
    assert page.count("<svg") == 1
    assert not re.search(r'(src|href)="', page)  # nothing fetched


def test_no_rows_gives_an_empty_chart() -> None:
    svg = svg_chart([])
    assert "<rect" not in svg
    assert svg.startswith("<svg")
    assert svg.endswith("</svg>")
