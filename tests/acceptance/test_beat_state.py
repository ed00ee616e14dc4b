"""Beat keeps no pickle anywhere, and a second beat waits instead of doubling every kick.

Real beat processes against the tests' Redis. Celery's default scheduler unpickles its shelve
file at start; a crafted file there ran code as beat (the Procfile put it in /tmp).
"""

from __future__ import annotations

import shelve
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from afterwrite.demo import processes
from tests.faults import log_lines
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance

SENDING = r"Sending due task dispatch"


@pytest.fixture
def beat_env(base_env: dict[str, str]) -> dict[str, str]:
    # beat says "Sending due task" only at DEBUG (afterwrite.worker.app.CHATTY_LOGGERS)
    return {**base_env, "AFTERWRITE_LOG_LEVEL": "DEBUG"}


class _Touch:
    """Unpickling this creates ``path``: the proof that a file was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _crafted_schedule(path: Path, marker: Path) -> None:
    with shelve.open(str(path)) as db:
        db["entries"] = _Touch(marker)


def test_beat_never_unpickles_a_schedule_file(beat_env: dict[str, str], tmp_path: Path) -> None:
    schedule = tmp_path / "celerybeat-schedule"
    control_marker = tmp_path / "control"
    _crafted_schedule(schedule, control_marker)
    # Control: loading this file the way Celery's default scheduler does runs the payload
    subprocess.run(
        [sys.executable, "-c", f"import shelve; shelve.open({str(schedule)!r})['entries']"],
        check=False,
        capture_output=True,
        timeout=30,
    )
    assert control_marker.exists(), "the crafted file does not prove anything"
    control_marker.unlink()

    marker = tmp_path / "unpickled"
    _crafted_schedule(schedule, marker)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    beat = processes.Process(
        "beat",
        [
            str(Path(sys.executable).parent / "afterwrite"),
            "beat",
            "--schedule",
            str(schedule),  # what the Procfile and compose used to pass
        ],
        # the session's example kind (AFTERWRITE_IMPORTS) from the checkout, run from elsewhere
        {**beat_env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        tmp_path / "beat.log",
        cwd=workdir,
    )
    try:
        wait_for(lambda: log_lines(beat.log, SENDING), timeout_s=60, what="beat sending kicks")
    finally:
        beat.stop(timeout_s=10)
    assert not marker.exists(), "beat unpickled the schedule file"
    assert list(workdir.iterdir()) == [], "beat wrote a schedule file in its directory"


def test_a_second_beat_waits_and_takes_over_when_the_first_stops(
    beat_env: dict[str, str], tmp_path: Path
) -> None:
    first = processes.start_beat(beat_env, tmp_path / "first", loglevel="DEBUG")
    second: processes.Process | None = None
    try:
        wait_for(lambda: log_lines(first.log, SENDING), timeout_s=60, what="the first beat")
        second = processes.start_beat(beat_env, tmp_path / "second", loglevel="DEBUG")
        time.sleep(5)
        assert second.alive(), second.tail(3000)
        assert not log_lines(second.log, SENDING), "two beats sent the same kicks"
        first.stop(timeout_s=10)
        wait_for(
            lambda: log_lines(second.log, SENDING),
            timeout_s=60,
            what="the second beat taking over",
        )
    finally:
        first.stop(timeout_s=10)
        if second is not None:
            second.stop(timeout_s=10)
