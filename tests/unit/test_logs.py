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
        # provider errors: bearer tokens and sk- keys
        ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer ***"),
        ('{"Authorization": "Bearer sk-abcdef123456"}', '{"Authorization": "Bearer ***"}'),
        ("authorization=Basic dXNlcjpwdw==; next", "authorization=Basic ***; next"),
        ("sent bearer eyJhbGciOi.J9x_y to the proxy", "sent bearer *** to the proxy"),
        (
            "Error code: 401 - Incorrect API key provided: sk-proj-AbC123xyz789. You can find",
            "Error code: 401 - Incorrect API key provided: sk-***. You can find",
        ),
        ("API key provided: sk-abc****************wxyz.", "API key provided: sk-***."),
        ("key sk-ant-api03-XYZ_abc-123 refused", "key sk-*** refused"),
        ("task-1234567 and disk-0001234", "task-1234567 and disk-0001234"),
        # JSON and quoted passwords
        ('{"user": "bob", "password": "hunter 2"}', '{"user": "bob", "password": "***"}'),
        ('{"db_password":"a\\"b", "n": 1}', '{"db_password":"***", "n": 1}'),
        ("connect(password='hunter 2', host='db')", "connect(password='***', host='db')"),
        ('PASSWORD = "s3cret;x" user=x', 'PASSWORD = "***" user=x'),
        ("{'api_key': 'k-123', 'model': 'gpt'}", "{'api_key': '***', 'model': 'gpt'}"),
        ('{"prompt_tokens": "5", "token_count": "7"}',) * 2,
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
