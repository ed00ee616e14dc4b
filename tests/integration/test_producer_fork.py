"""A client created before ``fork`` (gunicorn, Celery prefork) works in the child, and nothing
the parent had buffered or spilled is sent twice."""

from __future__ import annotations

import importlib
import json
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from afterwrite.core import wire
from afterwrite.core.settings import Settings
from afterwrite.producer import Client, Outcome
from afterwrite.spill.journal import SpillJournal

STREAM = "afterwrite:stream:query"
FORKS = 50


def in_child(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``work`` in a forked child; return what it returned (as JSON through a pipe)."""
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python >= 3.12 warns about fork() in a process with threads: that is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(read_fd)
            os.write(write_fd, json.dumps(work()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result


def stream_ids(rdb: redis.Redis) -> list[str]:
    entries: Any = rdb.xrange(STREAM)
    return [wire.decode(fields[wire.PAYLOAD_FIELD])["id"] for _, fields in entries]


def test_background_child_records_on_its_own_and_parents_buffer_is_sent_once(
    settings: Settings, rdb: redis.Redis, tmp_path: Path
) -> None:
    s = settings.model_copy(
        update={
            "producer_mode": "background",
            "spill_dir": tmp_path,
            "producer_flush_interval_ms": 60_000.0,  # the parent's records stay buffered
        }
    )
    client = Client.from_env(s)
    try:
        parent_ids = [str(client.record_query(f"parent {i}")) for i in range(100)]
        assert rdb.xlen(STREAM) == 0  # still in the parent's buffer at the fork

        def child() -> dict[str, Any]:
            receipts = [client.record_query(f"child {i}") for i in range(50)]
            flushed = client.flush(10)
            return {
                "ids": [str(r) for r in receipts],
                "buffered": all(r.outcome is Outcome.BUFFERED for r in receipts),
                "flushed": flushed,
                "stats": client.stats.snapshot(),
            }

        child_result = in_child(child)
        assert child_result["flushed"]
        assert child_result["buffered"]
        assert child_result["stats"]["recorded"] == 50  # the child's own counters
        assert child_result["stats"]["sent"] == 50
        assert sorted(stream_ids(rdb)) == sorted(child_result["ids"])  # not the parent's
        assert client.flush(10)
    finally:
        client.close()
    ids = stream_ids(rdb)
    assert len(ids) == 150
    assert sorted(ids) == sorted(parent_ids + child_result["ids"])
    assert client.stats.snapshot()["sent"] == 100


def test_direct_child_spills_into_a_segment_of_its_own(settings: Settings, tmp_path: Path) -> None:
    s = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0", "spill_dir": tmp_path})
    client = Client.from_env(s)
    parent = [client.record_query(f"parent {i}") for i in range(10)]
    assert {r.outcome for r in parent} == {Outcome.SPILLED}  # the parent's segment is open

    def child() -> dict[str, Any]:
        receipts = [client.record_query(f"child {i}") for i in range(10)]
        return {"ids": [str(r) for r in receipts], "pid": os.getpid()}

    child_result = in_child(child)  # exits without closing: its lock dies with it
    parent += [client.record_query(f"parent again {i}") for i in range(10)]
    client.close()

    (target,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    names = sorted(p.name for p in target.iterdir())
    assert any(f"-{child_result['pid']}-" in n for n in names)
    assert any(f"-{os.getpid()}-" in n for n in names)
    journal = SpillJournal(target, max_bytes=10_000_000)
    replayed: list[str] = []

    def send(items: list[tuple[str, bytes]]) -> int:
        replayed.extend(wire.decode(e)["id"] for _, e in items)
        return len(items)

    while journal.replay_once(send, 100)[0]:
        pass
    assert journal.skipped_bytes == 0  # no interleaved writes from two processes
    assert sorted(replayed) == sorted([str(r) for r in parent] + child_result["ids"])


def test_forking_while_the_parents_flusher_is_busy_never_hangs_the_child(
    settings: Settings, rdb: redis.Redis, tmp_path: Path
) -> None:
    """At a fork, the parent's flusher thread may be in the middle of a round trip, holding
    locks of the connection pool; the child must not need any of them."""
    s = settings.model_copy(
        update={
            "producer_mode": "background",
            "spill_dir": tmp_path,
            "producer_flush_interval_ms": 0.5,
            "producer_flush_max_entries": 5,
        }
    )
    client = Client.from_env(s)
    stop = threading.Event()

    def busy_parent() -> None:
        while not stop.is_set():
            client.record_query("parent traffic")

    thread = threading.Thread(target=busy_parent)
    thread.start()
    children: list[int] = []
    try:
        for _ in range(FORKS):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    client.record_query("from a child")
                    code = 2
                    if client.flush(5):
                        code = 0 if client.stats.snapshot()["sent"] == 1 else 3
                finally:
                    os._exit(code)
            children.append(pid)
            time.sleep(0.005)
        deadline = time.monotonic() + 30
        codes: dict[int, int] = {}
        while len(codes) < len(children) and time.monotonic() < deadline:
            for pid in children:
                if pid not in codes:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[pid] = os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        hung = [pid for pid in children if pid not in codes]
        for pid in hung:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert not hung, f"{len(hung)} of {len(children)} children hung after fork"
        assert set(codes.values()) == {0}
    finally:
        stop.set()
        thread.join(10)
        client.close()
    assert sum(1 for e in stream_ids_of_query(rdb) if e == "from a child") == FORKS


def stream_ids_of_query(rdb: redis.Redis) -> list[str]:
    entries: Any = rdb.xrange(STREAM)
    return [wire.decode(fields[wire.PAYLOAD_FIELD])["query"] for _, fields in entries]


def _record_without_flushing(client: Client, count: int) -> None:
    for i in range(count):
        client.record_query(f"pool child {i}")
    # returns with everything still buffered; the process then ends with os._exit


@pytest.mark.parametrize("library", ["multiprocessing", "billiard"])
def test_pool_style_children_flush_at_exit_although_they_skip_atexit(
    library: str, settings: Settings, rdb: redis.Redis, tmp_path: Path
) -> None:
    """multiprocessing and billiard (Celery's prefork pool) end a child with os._exit after
    running their own finalizers; the client's buffer is flushed by one of those."""
    module: Any = importlib.import_module(library)
    s = settings.model_copy(
        update={
            "producer_mode": "background",
            "spill_dir": tmp_path,
            "producer_flush_interval_ms": 60_000.0,  # nothing is sent before the exit
        }
    )
    client = Client.from_env(s)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            process = module.get_context("fork").Process(
                target=_record_without_flushing, args=(client, 200)
            )
            process.start()
        process.join(30)
        assert process.exitcode == 0
        assert rdb.xlen(STREAM) == 200
    finally:
        client.close()
