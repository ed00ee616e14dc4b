"""Producer-side redaction (``AFTERWRITE_PRODUCER_REDACT``): the worker's rules, applied before a
record reaches Redis or the spill journal.

Off by default: the worker redacts every entry before anything is stored, and the request
handler pays nothing. Teams that must not let raw text reach Redis at all turn this on and pay
the redaction on the request path (see the README's figures per call).
"""

from __future__ import annotations

from typing import Any

import msgspec

from afterwrite.core import redaction
from afterwrite.core.settings import Settings

_RECORDS_RAN = frozenset({"query"})
"""Built-in kinds whose table has ``redacted_by`` (an application's own kind may not)."""


class ProducerRedaction:
    """Callable ``(kind, record) -> record``. Raises RedactionFailed when a redactor raises:
    the record is then not sent (the call's receipt says INVALID), never sent raw."""

    def __init__(self, settings: Settings) -> None:
        self._by_kind = redaction.producer_redactors(settings.redaction_rules(), settings.redactor)

    def __contains__(self, kind: str) -> bool:
        return kind in self._by_kind

    def __call__(self, kind: str, record: Any) -> Any:
        redactor = self._by_kind.get(kind)
        if redactor is None:
            return record
        payload = msgspec.structs.asdict(record) if isinstance(record, msgspec.Struct) else record
        out, ran = redactor.apply({k: v for k, v in payload.items() if v is not None})
        if ran and kind in _RECORDS_RAN:
            out = {**out, "redacted_by": ran}
        return out


def for_settings(settings: Settings) -> ProducerRedaction | None:
    """The producer's redaction, or None when ``AFTERWRITE_PRODUCER_REDACT`` is off or there
    are no rules (the hot path then pays one attribute test)."""
    if not settings.producer_redact or not settings.redact:
        return None
    return ProducerRedaction(settings)
