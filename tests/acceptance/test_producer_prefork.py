"""A prefork web server (the gunicorn pattern) in background mode through a Redis outage.

The master process creates one background :class:`producer.Client` and forks three workers.
Each worker records realistic queries at a steady rate and exits normally (the atexit hook
flushes its buffer, spilling what Redis does not take). Redis is stopped for a while in the
middle. The master outlives its workers and replays what they spilled (their segment locks
died with them). A real Celery worker and beat store everything.

Promise checked: every id a worker was handed back as BUFFERED or SPILLED is in PostgreSQL
exactly once; the master's own buffer (recorded before the fork) is sent once, not once per
worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults import Launcher, Stack, assert_exactly_once, row_count
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance

WORKERS = 3
PER_WORKER = 3000
RATE_PER_S = 1000

SERVER = """
import os, sys, time
from pathlib import Path
from afterwrite.producer import Client
from afterwrite.spill.files import SUFFIX
from afterwrite.demo import traffic

out = Path(sys.argv[1])
client = Client.from_env()  # AFTERWRITE_PRODUCER_MODE=background
master = [str(client.record_query(f"master {{i}}")) for i in range(100)]  # buffered at the fork
(out / "master.ids").write_text("\\n".join(master))
for w in range({workers}):
    if os.fork() == 0:
        ids = []
        start = time.monotonic()
        for i, kw in enumerate(traffic.queries({per_worker}, seed=100 + w)):
            r = client.record_query(**kw)
            ids.append(f"{{r}} {{r.outcome.value}}")
            if i % 50 == 49:
                time.sleep(max(0.0, (i + 1) / {rate} - (time.monotonic() - start)))
        (out / f"worker-{{w}}.ids").write_text("\\n".join(ids))
        sys.exit(0)  # a normal exit: atexit flushes (or spills) this worker's buffer
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
# A long-lived master: it keeps replaying until its dead workers' spill is gone.
spill = Path(os.environ["AFTERWRITE_SPILL_DIR"])
deadline = time.monotonic() + 90
while list(spill.rglob("*" + SUFFIX)) and time.monotonic() < deadline:
    time.sleep(0.1)
print(client.stats.snapshot(), flush=True)
client.close()
"""


def test_prefork_workers_through_a_redis_outage_store_every_record_once(
    stack: Stack, launcher: Launcher, tmp_path: Path
) -> None:
    env = stack.env()
    launcher.beat(env)
    launcher.worker(env)
    assert stack.spill_dir is not None
    server_env = stack.env(
        producer_mode="background",
        spill_dir=str(stack.spill_dir),
        spill_replay_interval_s="0.2",
    )
    code = SERVER.format(workers=WORKERS, per_worker=PER_WORKER, rate=RATE_PER_S)
    server = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        env=server_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group: a hung run is killed with all its workers
    )
    try:
        wait_for(lambda: row_count(stack.database_url) > 0, timeout_s=30, what="first rows")
        stack.services.stop_redis()
        time.sleep(1.5)  # the workers keep recording: into their buffers, then the journal
        stack.start_redis()
        out, err = server.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        if server.returncode is None:
            server.communicate()
    assert server.returncode == 0, err[-3000:]

    lines = [
        line.split()
        for w in range(WORKERS)
        for line in (tmp_path / f"worker-{w}.ids").read_text().splitlines()
    ]
    assert len(lines) == WORKERS * PER_WORKER
    outcomes = {outcome for _, outcome in lines}
    assert outcomes <= {"buffered", "spilled"}  # "spilled": the buffer was full in the outage
    assert not list(stack.spill_dir.rglob("*.awspill")), "the master did not replay everything"
    expected = [i for i, _ in lines] + (tmp_path / "master.ids").read_text().split()

    def stored() -> bool:
        return row_count(stack.database_url) >= len(expected)

    wait_for(stored, timeout_s=120, what=f"{len(expected)} rows")
    time.sleep(1.0)  # one more beat: nothing else may arrive
    assert_exactly_once(stack.database_url, expected)
    print(out)
