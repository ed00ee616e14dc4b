"""Small helpers shared by the test layers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], *, timeout_s: float = 30.0, interval_s: float = 0.1, what: str = ""
) -> T:
    """Poll until ``predicate()`` is truthy; return its value or fail with ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(interval_s)


# The crash-probe kind (tests/crash_kind.py) is registered only inside worker subprocesses;
# tests import these names from here so that importing them does not register the kind.
CRASH_KIND_TABLE = "test_crash_probe"
CRASH_KIND_KILL_NOTE = "kill my consumer"
CRASH_KIND_CREATE_SQL = (
    f"CREATE TABLE IF NOT EXISTS {CRASH_KIND_TABLE} (id uuid PRIMARY KEY, note text NOT NULL)"
)
