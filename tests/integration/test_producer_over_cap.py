"""A stream at its cap: records spill instead of growing it, and are replayed as it drains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from afterwrite.core.settings import Settings
from afterwrite.producer import Client, Outcome
from afterwrite.worker.runtime import Runtime
from tests.helpers import wait_for

STREAM = "afterwrite:stream:query"
CAP = 50


@pytest.mark.parametrize("mode", ["direct", "background"])
def test_over_cap_records_spill_and_are_replayed_as_the_stream_drains(
    mode: str,
    settings: Settings,
    rdb: redis.Redis,
    pg: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    s = settings.model_copy(
        update={
            "producer_mode": mode,
            "spill_dir": tmp_path,
            "stream_max_entries": CAP,
            "producer_cap_check_interval_s": 1e-6,  # every direct call checks: an exact bound
            "producer_flush_max_entries": 40,
            "spill_replay_interval_s": 0.05,
        }
    )
    with Client.from_env(s) as client:
        receipts = [client.record_query(f"q{i}") for i in range(300)]
        assert client.flush(5)
        assert rdb.xlen(STREAM) == CAP  # not one more
        snap = client.stats.snapshot()
        assert snap["over_cap"] == snap["spilled"] == 300 - CAP
        assert snap["sent"] == CAP
        if mode == "direct":
            outcomes = [r.outcome for r in receipts]
            assert outcomes == [Outcome.SENT] * CAP + [Outcome.SPILLED] * (300 - CAP)

        runtime = Runtime(s)
        longest = [0]
        try:

            def all_stored() -> bool:
                longest[0] = max(longest[0], rdb.xlen(STREAM))
                runtime.drain("query").run(budget_s=5)
                row = pg.execute("SELECT count(*) FROM query_history").fetchone()
                return row is not None and row[0] >= 300

            wait_for(all_stored, timeout_s=60, interval_s=0.02, what="300 rows")
        finally:
            runtime.close()
        assert longest[0] <= CAP  # replay fills the stream only up to its cap
        wait_for(lambda: client.stats.snapshot()["replayed"] == 300 - CAP, what="counters")
    ids = [r[0] for r in pg.execute("SELECT id::text FROM query_history").fetchall()]
    assert sorted(ids) == sorted(str(r) for r in receipts)
    assert client.stats.snapshot()["dropped"] == 0
