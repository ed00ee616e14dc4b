"""The producer's decision of whether to talk to Redis at all, shared by sync and async clients.

Pure state with an injected clock: after a failure the gate stays shut for a short back-off, so
a request handler pays one socket timeout when Redis goes away, not one per call; the stream
length is re-read at most every ``cap_check_interval_s`` to enforce the backlog cap; failures
are logged once per outage, not once per call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from afterwrite.producer.records import Outcome

log = logging.getLogger("afterwrite.producer")

RETRY_AFTER_FAILURE_S = 1.0


class Gate:
    def __init__(
        self,
        *,
        max_entries: int,
        cap_check_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_entries = max_entries
        self._cap_check_interval_s = cap_check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._shut_until = 0.0
        self._failing = False
        self._over_cap: set[str] = set()
        self._cap_checked_at: dict[str, float] = {}
        self._policy = "noeviction"

    def admit(self, stream: str) -> tuple[Outcome | None, bool]:
        """Before a send: (outcome to report without sending, or None; whether to read XLEN too)."""
        now = self._clock()
        if now < self._shut_until:
            return Outcome.FAILED, False
        check = now - self._cap_checked_at.get(stream, -1e18) >= self._cap_check_interval_s
        if stream in self._over_cap and not check:
            return Outcome.OVER_CAP, False
        return None, check

    def sent(self, stream: str, length: int | None) -> Outcome:
        """After Redis took the entry. ``length`` is the stream length when it was read; over
        the cap, later calls stop adding (this one's entry is already in: the cap is soft)."""
        with self._lock:
            self._recovered_locked()
            if length is not None:
                self._cap_checked_at[stream] = self._clock()
                if length > self._max_entries:
                    self._mark_over_cap(stream, f"{length} > {self._max_entries}")
                else:
                    self._over_cap.discard(stream)
        return Outcome.SENT

    def over_cap(self, stream: str) -> Outcome:
        """Redis refused entries because ``stream`` is full (a batch send found no room): later
        sends stop until the next cap check."""
        with self._lock:
            self._cap_checked_at[stream] = self._clock()
            self._mark_over_cap(stream, f"at its cap of {self._max_entries}")
        return Outcome.OVER_CAP

    def memory(self, stream: str, *, high: bool, policy: str) -> None:
        """What the batch script saw of Redis memory (with each batch or cap check)."""
        if policy != self._policy:
            self._policy = policy
            if policy not in ("noeviction", "unknown"):
                log.error(
                    "redis evicts keys (maxmemory-policy %s): under memory pressure it deletes "
                    "whole streams and their consumer groups, records already reported as sent. "
                    "Set maxmemory-policy noeviction (afterwrite workers refuse to start)",
                    policy,
                    extra={"action": "eviction_policy"},
                )
        if high:
            with self._lock:
                self._cap_checked_at[stream] = self._clock()
                self._mark_over_cap(stream, "Redis memory above the high-water mark")

    def _mark_over_cap(self, stream: str, detail: str) -> None:
        if stream not in self._over_cap:
            log.warning(
                "stream %s over its cap (%s); not adding until it drains",
                stream,
                detail,
                extra={"action": "over_cap"},
            )
        self._over_cap.add(stream)

    def reset_after_fork(self) -> None:
        """In a forked child: a fresh lock (a parent thread may have held this one)."""
        self._lock = threading.Lock()

    @property
    def failing(self) -> bool:
        """Redis failed and has not taken anything since."""
        return self._failing

    def reachable(self) -> None:
        """Redis answered (a probe): end the outage."""
        with self._lock:
            self._recovered_locked()

    def _recovered_locked(self) -> None:
        if self._failing:
            self._failing = False
            self._shut_until = 0.0
            log.info("redis reachable again; producer sending", extra={"action": "recover"})

    @property
    def shut(self) -> bool:
        """Redis failed recently: do not try it before the back-off ends."""
        return self._clock() < self._shut_until

    def failed(self, exc: BaseException) -> Outcome:
        with self._lock:
            self._shut_until = self._clock() + RETRY_AFTER_FAILURE_S
            if not self._failing:
                self._failing = True
                log.warning(
                    "redis unavailable (%s: %s); records are not being handed over",
                    type(exc).__name__,
                    exc,
                    extra={"action": "redis_down"},
                )
        return Outcome.FAILED
