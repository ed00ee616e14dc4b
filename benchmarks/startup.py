"""``afterwrite bench --suite startup``: what importing the client and starting the CLI cost.

Each figure is the median wall time of :data:`RUNS` fresh interpreters (after one warm-up run
that fills the OS page cache), so it includes interpreter start-up, as a web process or a shell
user pays it. ``import redis`` is the reference: a client that records onto Redis cannot cost
less than Redis's own client. ``afterwrite status`` runs against the bench's empty pipeline.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RUNS = 5

TARGETS = {
    "client_import_vs_redis": 3.0,
    "help_s": 0.5,
    "status_s": 1.5,
}
"""Targets on an idle machine: client import at most 3× ``import redis``; ``afterwrite --help``
at most 0.5 s; ``afterwrite status`` at most 1.5 s."""


def _median_s(argv: Sequence[str], env: Mapping[str, str], runs: int = RUNS) -> float:
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        done = subprocess.run(argv, env=dict(env), capture_output=True, check=False)
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-2000:]}"
            )
        if i:  # the first run warms the page cache
            times.append(elapsed)
    return statistics.median(times)


def _cli() -> str:
    found = shutil.which("afterwrite", path=str(Path(sys.executable).parent))
    return found or "afterwrite"


def measure_startup(env: Mapping[str, str], runs: int = RUNS) -> dict[str, Any]:
    """Median wall times of the import and CLI commands, run with ``env`` (the bench's
    settings: its database and Redis)."""
    py = sys.executable
    redis_s = _median_s([py, "-c", "import redis"], env, runs)
    client_s = _median_s([py, "-c", "import afterwrite; afterwrite.Client"], env, runs)
    bare_s = _median_s([py, "-c", "pass"], env, runs)
    help_s = _median_s([_cli(), "--help"], env, runs)
    status_s = _median_s([_cli(), "status"], env, runs)
    return {
        "runs": runs,
        "python_s": round(bare_s, 3),
        "import_redis_s": round(redis_s, 3),
        "import_client_s": round(client_s, 3),
        "client_import_vs_redis": round(client_s / redis_s, 2),
        "help_s": round(help_s, 3),
        "status_s": round(status_s, 3),
        "targets": TARGETS,
    }
