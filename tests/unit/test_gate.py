"""The producer's gate with an injected clock: no sleeping."""

from __future__ import annotations

import logging

import pytest

from afterwrite.producer.gate import RETRY_AFTER_FAILURE_S, Gate
from afterwrite.producer.records import Outcome


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_failure_shuts_the_gate_for_a_while_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    gate = Gate(max_entries=10, cap_check_interval_s=1.0, clock=clock)
    with caplog.at_level(logging.INFO, "afterwrite.producer"):
        assert gate.admit("s") == (None, True)
        assert gate.failed(ConnectionError("down")) is Outcome.FAILED
        for _ in range(100):
            assert gate.admit("s")[0] is Outcome.FAILED  # no socket work while shut
        clock.now += RETRY_AFTER_FAILURE_S
        refused, _ = gate.admit("s")
        assert refused is None  # try again
        gate.failed(ConnectionError("still down"))
        clock.now += RETRY_AFTER_FAILURE_S
        assert gate.sent("s", 0) is Outcome.SENT
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1


def test_stream_over_cap_stops_adding_until_it_drains() -> None:
    clock = Clock()
    gate = Gate(max_entries=10, cap_check_interval_s=1.0, clock=clock)
    assert gate.admit("s") == (None, True)
    assert gate.sent("s", 11) is Outcome.SENT  # this entry is in; later ones are not
    assert gate.admit("s") == (Outcome.OVER_CAP, False)
    assert gate.admit("other") == (None, True)  # caps are per stream
    clock.now += 1.0
    assert gate.admit("s") == (None, True)  # time to look again
    gate.sent("s", 3)
    assert gate.admit("s") == (None, False)
