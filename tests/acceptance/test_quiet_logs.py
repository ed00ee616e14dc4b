"""An idle pipeline is quiet at INFO, and what was done is still said.

Real worker and beat processes at INFO. Before: ~840 lines a minute from an idle pair (every
task received and succeeded, every kick sent).
"""

from __future__ import annotations

import time

import pytest

from afterwrite.producer import Client
from tests.faults import Launcher, Stack, log_lines
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance

CHATTER = r"Task afterwrite\.\S+ (received|succeeded)|Sending due task"


def test_idle_worker_and_beat_log_nothing_and_a_batch_is_one_line(
    stack: Stack, launcher: Launcher
) -> None:
    env = stack.env()
    beat = launcher.beat(env)
    worker = launcher.worker(env, loglevel="INFO")
    wait_for(lambda: log_lines(worker.log, r"ready\."), timeout_s=60, what="the worker")
    time.sleep(8)  # ~8 kicks of every drain, embed and refresh, with nothing to do
    assert not log_lines(worker.log, CHATTER), worker.tail(2000)
    assert not log_lines(beat.log, CHATTER), beat.tail(2000)

    with Client.from_env(stack.settings(producer_timeout_ms=2000)) as client:
        for i in range(20):
            client.record_query(f"q{i}")
    wait_for(
        lambda: log_lines(worker.log, r"batch kind=query entries=\d+ inserted=\d+"),
        timeout_s=60,
        what="the batch logged at INFO",
    )
