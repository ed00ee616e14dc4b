"""Benchmarks (replaced by the full benchmark module)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from afterwrite.settings import Settings


def run_bench(
    settings: Settings, *, entries: int, calls: int, baseline: bool, console: Console
) -> dict[str, Any]:
    raise NotImplementedError("the benchmark is not written yet")
