from __future__ import annotations

import json
import logging

import pytest

from afterwrite.core.logs import JsonFormatter, SecretFilter, install, mask


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://app:s3cret@cache:6380", "rediss://app:***@cache:6380"),
        ("postgresql://u:p%40ss@db/app failed", "postgresql://u:***@db/app failed"),
        ("dsn host=db password=hunter2 user=x", "dsn host=db password=*** user=x"),
        ("postgresql://u@db/app", "postgresql://u@db/app"),
        ("no secrets here", "no secrets here"),
    ],
)
def test_mask(text: str, expected: str) -> None:
    assert mask(text) == expected


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("afterwrite.test", logging.INFO, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_filter_masks_formatted_messages() -> None:
    record = _record("connecting to %s", "redis://:pw@h:1/0")
    assert SecretFilter().filter(record)
    assert record.getMessage() == "connecting to redis://:***@h:1/0"


def test_json_lines_carry_action_and_extras() -> None:
    line = JsonFormatter().format(_record("batch done", action="batch", entries=5))
    parsed = json.loads(line)
    assert parsed["action"] == "batch"
    assert parsed["entries"] == 5
    assert parsed["message"] == "batch done"
    assert parsed["ts"].endswith("Z")


def test_install_is_idempotent() -> None:
    handler = logging.StreamHandler()
    install([handler], json_format=True)
    install([handler], json_format=True)
    assert sum(isinstance(f, SecretFilter) for f in handler.filters) == 1
    assert isinstance(handler.formatter, JsonFormatter)
