"""The bench's worker CPU per row at full speed: fixed costs at either end are left out."""

from __future__ import annotations

from benchmarks.procfs import RssSampler


def test_steady_cpu_per_row_leaves_out_start_up_and_tail() -> None:
    rss = RssSampler(root=1, started=0.0)
    # 0.5 s of CPU before the first row (pool children loading), then 10 µs a row, then a tail
    rss.progress = [(0, 0.5)] + [(n, 0.5 + n * 10e-6) for n in range(10_000, 100_001, 10_000)]
    rss.progress.append((100_000, 1.6))
    assert rss.steady_us_per_row() == 10.0
    whole = (rss.progress[-1][1] - rss.progress[0][1]) / 100_000 * 1e6
    assert round(whole, 6) == 11.0  # the figure the fixed costs inflate


def test_steady_cpu_per_row_needs_two_samples_inside_the_span() -> None:
    rss = RssSampler(root=1, started=0.0)
    assert rss.steady_us_per_row() is None
    rss.progress = [(0, 0.0), (50_000, 0.3), (100_000, 0.6)]
    assert rss.steady_us_per_row() is None  # only the 50 % sample lies in 20–90 %
