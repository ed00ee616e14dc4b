"""Which records an erasure's tombstone drops: the user's, recorded before it."""

from __future__ import annotations

from datetime import UTC, datetime

from afterwrite.core import erasure

T = 1_780_000_000_000  # the erasure, epoch ms
BEFORE = datetime.fromtimestamp((T - 5_000) / 1000, UTC)
AFTER = datetime.fromtimestamp((T + 5_000) / 1000, UTC)
TOMBS = {erasure.user_hash("u1"): T}


def test_users_are_named_by_user_id_tags_or_metadata() -> None:
    assert erasure.users_named({"user_id": "a"}) == ["a"]
    assert erasure.users_named({"tags": {"user": "b"}}) == ["b"]
    assert erasure.users_named({"metadata": {"user_id": "c", "user": "d"}}) == ["c", "d"]
    assert erasure.users_named({"metadata": {"owner": "e"}, "user_id": None}) == []
    assert erasure.users_named(["not", "a", "map"]) == []


def test_a_record_made_before_the_erasure_is_dropped_one_made_after_is_kept() -> None:
    assert erasure.is_erased({"user_id": "u1", "created_at": BEFORE}, T - 1000, TOMBS)
    assert not erasure.is_erased({"user_id": "u1", "created_at": AFTER}, T + 6000, TOMBS)
    assert not erasure.is_erased({"user_id": "u2", "created_at": BEFORE}, T - 1000, TOMBS)


def test_a_spilled_record_replayed_after_the_erasure_is_still_dropped() -> None:
    # Redis took it after the erasure, but it was made before
    assert erasure.is_erased({"tags": {"user_id": "u1"}, "created_at": BEFORE}, T + 60_000, TOMBS)


def test_the_hash_is_not_the_id() -> None:
    h = erasure.user_hash("alice@example.org")
    assert len(h) == 64
    assert "alice" not in h
