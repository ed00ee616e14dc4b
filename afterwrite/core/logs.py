"""Logging: secrets masked everywhere, and an optional JSON format with an ``action`` field.

Every afterwrite log call passes ``extra={"action": ...}`` (batch, redis_down, hand_back, …),
so a JSON log line can be filtered by what happened. A filter on the handlers masks secrets, so
a driver's or provider's error message that repeats one never leaks it: passwords in URLs
(``redis://:pw@``, ``postgresql://user:pw@``), ``password=`` pairs, quoted and JSON forms
(``password='…'``, ``"password": "…"``), ``Authorization`` values, ``Bearer`` tokens and
``sk-…`` API keys (as in OpenAI's "Incorrect API key provided: sk-…").
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_SECRET_NAMES = r"password|passwd|pwd|secret|token|api[_-]?key"  # noqa: S105 (key names)
# ``password='…'``, ``password="…"``, ``"password": "…"``, ``'api_key': '…'`` (key optionally
# quoted, ``=`` or ``:``, value quoted with backslash escapes).
_QUOTED_PASSWORD = re.compile(
    rf"""(?i)(?P<key>["']?[\w.-]*?(?:{_SECRET_NAMES})["']?\s*[:=]\s*)"""
    r"""(?P<q>["'])(?:\\.|(?!(?P=q))[^\\])*(?P=q)"""
)
# ``password=hunter2``: an unquoted value (a quoted one is the pattern above).
_KV_PASSWORD = re.compile(rf"(?i)(?P<key>{_SECRET_NAMES})=(?P<pw>[^\s&;,'\"][^\s&;,]*)")
# ``Authorization: Basic dXNlcjpwdw==`` (any scheme) and ``Bearer <token>`` anywhere.
_AUTHORIZATION = re.compile(
    r"""(?i)(?P<key>authorization["']?\s*[:=]\s*["']?)(?:(?P<scheme>[a-z]+)\s+)?[^\s"',;]+"""
)
_BEARER = re.compile(r"(?i)\b(?P<scheme>bearer)\s+(?!\*\*\*)[A-Za-z0-9._~+/=-]+")
# OpenAI-style keys (``sk-…``, ``sk-proj-…``, ``sk-ant-…``), also when partly starred out.
_SK_KEY = re.compile(r"\bsk-[A-Za-z0-9_*-]{6,}")

# Attributes every LogRecord has; anything else came in through ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def mask(text: str) -> str:
    """``text`` with every secret afterwrite recognises replaced by ``***``."""
    text = _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", text)
    text = _QUOTED_PASSWORD.sub(r"\g<key>\g<q>***\g<q>", text)
    text = _KV_PASSWORD.sub(r"\g<key>=***", text)
    text = _AUTHORIZATION.sub(_authorization, text)
    text = _BEARER.sub(r"\g<scheme> ***", text)
    return _SK_KEY.sub("sk-***", text)


def _authorization(match: re.Match[str]) -> str:
    scheme = match.group("scheme")
    return match.group("key") + (f"{scheme} ***" if scheme else "***")


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
