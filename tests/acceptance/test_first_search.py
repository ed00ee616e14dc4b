"""A new collection answers searches within seconds of its first documents.

Real worker and beat, the bundled local model, a rebuild tick far away: only the collection's
first vectors can start its first build. Before, it answered 503 until the next tick (up to
`AFTERWRITE_INDEX_REBUILD_INTERVAL_S`, a minute).
"""

from __future__ import annotations

import time

import pytest

from afterwrite import IndexReader
from afterwrite.producer import Client
from afterwrite.readers.index_reader import IndexUnavailable
from tests.faults import Launcher, Stack
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance


def test_a_new_collections_first_vectors_start_its_first_build(
    stack: Stack, launcher: Launcher
) -> None:
    env = stack.env(index_rebuild_interval_s="3600", embedding_provider="local")
    launcher.beat(env)
    launcher.worker(env)
    settings = stack.settings(embedding_provider="local", producer_timeout_ms=2000)
    started = time.monotonic()
    with Client.from_env(settings) as client:
        client.embed("handbook", "d1", "Invoices are issued on the first day of each month.")
        client.embed("handbook", "d2", "Refunds take five business days.")
    reader = IndexReader("handbook", settings=settings, check_interval_s=0.1)

    def searchable() -> bool:
        try:
            hits = reader.search("when are invoices sent?", k=1)
        except IndexUnavailable:
            return False
        return [doc for doc, _ in hits] == ["d1"]

    wait_for(searchable, timeout_s=90, interval_s=0.2, what="the first search")
    print(f"\nfirst embed call → first successful search: {time.monotonic() - started:.1f}s")
