"""``History.similar`` finds an earlier question asked in other words: real worker and beat,
``AFTERWRITE_EMBED_QUERIES=true``, the bundled offline model. The query's text travels from the
drain of ``query`` through the embed stream, the embedding stage and the first index build of
the ``queries`` collection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from afterwrite import History
from afterwrite.history import Hit
from afterwrite.producer import Client
from afterwrite.readers.index_reader import IndexUnavailable
from tests.faults import Launcher, Stack
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance

QUESTIONS = [
    ("alice", "How do I reset my password?", "Use the link on the sign-in page."),
    ("bob", "When are invoices sent to customers?", "On the first day of each month."),
    ("alice", "Which regions is the service available in?", "Europe and North America."),
    ("carol", "Can I export my data as CSV?", "Yes, from the settings page."),
]


def test_similar_finds_a_paraphrase_of_an_earlier_question(
    stack: Stack, launcher: Launcher, tmp_path: Path
) -> None:
    indexes = tmp_path / "indexes"  # this test's own: never an index of another database
    env = stack.env(embed_queries="true", embedding_provider="local", index_dir=str(indexes))
    launcher.beat(env)
    launcher.worker(env)
    settings = stack.settings(
        embedding_provider="local", producer_timeout_ms=2000, index_dir=indexes
    )
    start = datetime.now(UTC) - timedelta(minutes=1)
    with Client.from_env(settings) as client:
        ids = [
            str(
                client.record_query(
                    q, response=a, user_id=u, created_at=start + timedelta(seconds=i)
                )
            )
            for i, (u, q, a) in enumerate(QUESTIONS)
        ]
    history = History.from_env(settings)
    found: list[Hit] = []

    def answered() -> bool:
        try:
            found[:] = history.similar("I forgot my password, how can I change it?", k=4)
        except IndexUnavailable:
            return False
        return len(found) == len(QUESTIONS)  # every question embedded and searchable

    wait_for(answered, timeout_s=120, interval_s=0.3, what="similar questions")
    best = found[0]
    assert best.record.id == ids[0]
    assert best.record.query == "How do I reset my password?"
    assert best.record.response == "Use the link on the sign-in page."  # reuse the answer
    assert best.score > found[1].score

    # one user's questions only
    mine = history.similar("billing: when do I get my invoice?", k=3, user_id="bob")
    assert [h.record.id for h in mine] == [ids[1]]
    theirs = history.similar("in which countries can I use it?", k=1, user_id="alice")
    assert [h.record.id for h in theirs] == [ids[2]]
    history.close()
