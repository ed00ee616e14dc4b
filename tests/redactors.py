"""Redactor hooks for tests (``AFTERWRITE_REDACTOR=tests.redactors:…``)."""

from __future__ import annotations


def names(text: str) -> str:
    """A team's own rule: the customer names it knows."""
    return text.replace("Alice Liddell", "<NAME>")


def explode(text: str) -> str:
    """A redactor with a bug; its message quotes the text, which must not be kept."""
    raise RuntimeError(f"cannot redact {text!r}")
