"""Logging: secrets masked everywhere, and an optional JSON format with an ``action`` field.

Every afterwrite log call passes ``extra={"action": ...}`` (batch, redis_down, hand_back, …),
so a JSON log line can be filtered by what happened. Passwords in URLs (``redis://:pw@``,
``postgresql://user:pw@``) and ``password=`` pairs are masked by a filter on the handlers, so a
driver's error message that repeats a connection string never leaks it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_KV_PASSWORD = re.compile(
    r"(?i)(?P<key>password|passwd|pwd|secret|token|api_key)=(?P<pw>[^\s&;,]+)"
)

# Attributes every LogRecord has; anything else came in through ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def mask(text: str) -> str:
    text = _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", text)
    return _KV_PASSWORD.sub(r"\g<key>=***", text)


class SecretFilter(logging.Filter):
    """Masks secrets in the formatted message (and the exception text) of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = mask(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = mask(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, action and the extras."""

    converter = staticmethod(time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "action": getattr(record, "action", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def install(handlers: list[logging.Handler], *, json_format: bool) -> None:
    """Add the secret filter (and the JSON format) to ``handlers``. Idempotent."""
    for handler in handlers:
        if not any(isinstance(f, SecretFilter) for f in handler.filters):
            handler.addFilter(SecretFilter())
        if json_format:
            handler.setFormatter(JsonFormatter())
