"""Two-stage shutdown of a draining worker process (after rq).

First SIGTERM: stop taking batches; the batch in flight finishes (commit + acknowledge) and the
drain returns, so Celery's warm shutdown completes within one batch's time.
Second SIGTERM (at least ``DUPLICATE_WINDOW_S`` after the first): abandon the batch in
flight. Its transaction dies with the process (PostgreSQL rolls it back) and its entries are
handed back: marked idle past the reclaim threshold, so the next reclaim by any worker takes
them at once instead of waiting out ``reclaim_idle_s``.

Celery signals only its main process; :func:`forward_to_children` passes the first SIGTERM on
to the prefork pool's children, where the drains run. When the whole process group is signalled
(systemd's default, ``kill -- -PGID``), a child gets the signal twice within milliseconds,
directly and forwarded: a repeat inside the window counts as the same request.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

log = logging.getLogger("afterwrite.shutdown")

DUPLICATE_WINDOW_S = 1.0
"""A SIGTERM this soon after the first is the same request arriving twice, not a second one."""


class Shutdown:
    """Process-local shutdown state. ``requested`` is read by the drain loop between batches."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.requested = False
        self._requested_at = 0.0
        self._clock = clock
        self._hand_back: Callable[[], None] | None = None

    def install(self, hand_back: Callable[[], None]) -> None:
        """Handle SIGTERM in this process (a pool child): first stops, second abandons."""
        self._hand_back = hand_back
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def request(self) -> None:
        if not self.requested:
            self.requested = True
            self._requested_at = self._clock()
            log.info("shutdown requested: finishing the batch in flight", extra={"action": "stop"})

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            self.request()
            return
        if self._clock() - self._requested_at < DUPLICATE_WINDOW_S:
            return  # the group-wide signal and its forwarded copy: one request
        log.warning("second SIGTERM: abandoning the batch in flight", extra={"action": "abandon"})
        try:
            if self._hand_back is not None:
                self._hand_back()
        finally:
            os._exit(128 + signal.SIGTERM)


def child_pids(pid: int | None = None) -> list[int]:
    """Direct children of ``pid`` (default: this process), from /proc (Linux)."""
    parent = os.getpid() if pid is None else pid
    children: list[int] = []
    for task in Path(f"/proc/{parent}/task").glob("*/children"):
        try:
            children.extend(int(p) for p in task.read_text().split())
        except OSError:
            continue  # the thread ended while we looked
    return children


def forward_to_children(sig: int = signal.SIGTERM) -> None:
    for pid in child_pids():
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue  # exited meanwhile
