"""What a dead letter stores of its payload: the JSON shown to people, when there is one."""

from __future__ import annotations

import json

from afterwrite.worker.ingest.dead_letters import display_json


def test_nul_characters_are_shown_not_stored() -> None:
    assert json.loads(display_json({"q": "a\x00b"}) or "null") == {"q": "a\\u0000b"}


def test_a_payload_nested_deeper_than_the_encoder_goes_has_no_json() -> None:
    """Built from hostile input (a list 200,000 levels deep): no JSON, no exception; the
    dead letter keeps the raw bytes instead."""
    deep: list[object] = []
    for _ in range(200_000):
        deep = [deep]
    assert display_json({"q": deep}) is None
    assert display_json(None) is None
