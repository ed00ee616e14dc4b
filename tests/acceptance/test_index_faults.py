"""Index faults with real processes: 50 swaps under concurrent search in threads and in other
processes; a builder SIGKILLed while writing the index file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from afterwrite.demo.services import Endpoints
from afterwrite.readers.index_reader import IndexReader
from afterwrite.vectorindex import files
from afterwrite.worker.index import jobs
from tests.helpers import wait_for
from tests.index_helpers import add, index_settings, random_unit

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(120)]

DIM = 32
K = 10
ROOT = Path(__file__).resolve().parents[2]


def _thread_reader(reader: IndexReader, stop: threading.Event, out: dict[str, Any]) -> None:
    rng = np.random.default_rng()
    while not stop.wait(0.001):  # leave the builder (same GIL, 2 cores) room to work
        q = rng.standard_normal(DIM).astype(np.float32)
        try:
            hits = reader.search(q, K)
        except Exception as exc:
            out["failures"] += 1
            out["errors"].append(repr(exc))
            continue
        out["searches"] += 1
        gens = {doc.split("-", 1)[0] for doc, _ in hits}
        out["mixed"] += len(gens) != 1
        out["short"] += len(hits) != K
        out["generations"] |= gens


def test_fifty_swaps_under_search_in_threads_and_processes(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path)
    add(pg, "swap", random_unit(1000, DIM, seed=1), model=settings.collection_model("swap"),
        prefix="g0-")  # fmt: skip
    assert jobs.rebuild(settings, "swap")["version"] == 1

    stop_file = tmp_path / "stop"
    code = "import sys; from tests.index_helpers import reader_process_main as m; m(sys.argv[1:])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path), "swap", str(DIM), str(K), str(stop_file)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        reader = IndexReader("swap", tmp_path, check_interval_s=0.01)
        stop = threading.Event()
        stats: list[dict[str, Any]] = [
            {
                "searches": 0,
                "failures": 0,
                "mixed": 0,
                "short": 0,
                "generations": set(),
                "errors": [],
            }
            for _ in range(2)
        ]
        threads = [threading.Thread(target=_thread_reader, args=(reader, stop, s)) for s in stats]
        for t in threads:
            t.start()
        build_times: list[float] = []
        t0 = time.perf_counter()
        for gen in range(1, 51):
            pg.execute(
                "UPDATE embeddings SET doc_id = %s || substr(doc_id, position('-' in doc_id))"
                " WHERE collection = 'swap'",
                (f"g{gen}",),
            )
            report = jobs.rebuild(settings, "swap", force=True)
            assert report["version"] == gen + 1, report
            build_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop_file.touch()
        outputs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        stats.append(json.loads(out.strip().splitlines()[-1]))

    for s in stats:
        assert s["failures"] == 0, s["errors"][:3]
        assert s["mixed"] == 0  # every answer from exactly one version
        assert s["short"] == 0
        assert s["searches"] > 0
    seen = set().union(*(set(s["generations"]) for s in stats))
    print(f"per swap: max {max(build_times):.3f}s, total {sum(build_times):.1f}s")
    assert len(seen) > 10  # the readers really did read across the swaps
    assert reader.version == 51 or reader.reload()
    assert reader.version == 51


KILLED_BUILDER = """
import sys, time
from pathlib import Path
from afterwrite.core.settings import load_settings
from afterwrite.vectorindex import files
from afterwrite.worker.index import jobs

files.WRITE_CHUNK_BYTES = 4096  # many small writes: a window to be killed in
url, index_dir, marker = sys.argv[1:4]
settings = load_settings({}, database_url=url, index_dir=index_dir)

def progress(stage, done, total):
    if stage == "write" and 0 < done < total:
        Path(marker).write_text(f"{done}/{total}")
        time.sleep(3600)

jobs.rebuild(settings, "docs", force=True, progress=progress)
"""


def test_builder_killed_while_writing_leaves_old_version_serving(
    endpoints: Endpoints, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings = index_settings(endpoints, tmp_path)
    x = random_unit(2000, DIM, seed=2)
    doc_ids = add(pg, "docs", x, model=settings.collection_model("docs"))
    assert jobs.rebuild(settings, "docs")["version"] == 1
    before = (tmp_path / "docs" / files.MANIFEST).read_bytes()
    reader = IndexReader("docs", tmp_path, check_interval_s=0.0)

    marker = tmp_path / "writing"
    err = (tmp_path / "builder.err").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILDER, endpoints.database_url, str(tmp_path),
         str(marker)],
        cwd=ROOT,
        stderr=err,
    )  # fmt: skip
    try:
        wait_for(marker.exists, timeout_s=60, what="the builder to be writing its index file")
        temps = [p for p in (tmp_path / "docs").iterdir() if p.name.startswith(".tmp-")]
        assert temps
        assert temps[0].stat().st_size > 0
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
    assert proc.returncode == -signal.SIGKILL

    assert (tmp_path / "docs" / files.MANIFEST).read_bytes() == before
    assert not reader.reload()
    assert reader.search(x[5], 1)[0][0] == doc_ids[5]
    fresh = IndexReader("docs", tmp_path)  # a process starting now loads the old version
    assert fresh.version == 1
    assert fresh.search(x[6], 1)[0][0] == doc_ids[6]

    # the dead builder's lock died with its session; the next build cleans up and publishes
    report = jobs.rebuild(settings, "docs", force=True)
    assert report["status"] == "published"
    assert report["version"] == 2
    assert not [p for p in (tmp_path / "docs").iterdir() if p.name.startswith(".tmp-")]
    assert reader.reload()
    assert reader.version == 2
