"""What a drain does for privacy, in one place: redaction and bodies left out.

Called from exactly two spots of :mod:`afterwrite.worker.ingest.drain`, both behind ``if
privacy is not None`` (a kind without rules pays one attribute test per entry):

- :meth:`KindPrivacy.apply` on each decoded payload before it becomes a row, so rows and the
  embedding jobs made from them never hold what the rules redact;
- :meth:`KindPrivacy.dead_letter` on each dead letter before it is written: its decoded
  payload and detail are redacted, and its raw bytes are replaced by the redacted record
  (still replayable) unless ``AFTERWRITE_DEAD_LETTER_KEEP_RAW`` allows the original. An entry
  whose redaction failed keeps none of its content.

A query record stored without bodies (``record_query(store_text=False)``, or a mode or model in
``AFTERWRITE_NO_TEXT_MODES`` / ``_MODELS``) loses ``query`` and ``response`` here, in its row and
its dead letter alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any

from sqlalchemy import Table, types

from afterwrite.core import erasure, redaction, wire
from afterwrite.core.settings import Settings
from afterwrite.models.registry import Kind, kinds
from afterwrite.worker.ingest.dead_letters import DeadEntry
from afterwrite.worker.ingest.rows import Invalid

REDACTED_BY = "redacted_by"
"""The column (when a kind's table has it) recording which redactors ran on a row."""
BODIES = ("query", "response")
"""The fields a query record without text leaves out."""
REDACTION_FAILED = "redaction_failed"
TEXT_STORED = "text_stored"
_NOT_TEXT = frozenset({"id", REDACTED_BY, "model_ids"})


def text_fields(table: Table) -> list[str]:
    """The fields ``kind.*`` covers: unbounded text and JSON columns (not ids, not the short
    identifiers such as ``user_id`` or ``collection``, which erasure and routing need)."""
    out = []
    for column in table.columns:
        if column.name in _NOT_TEXT:
            continue
        t = column.type
        if isinstance(t, types.JSON) or (isinstance(t, types.Text | types.String) and not t.length):
            out.append(column.name)
    return out


def _fields_named(table: Table) -> list[str]:
    """Fields a rule may name: every text or JSON column."""
    return [
        c.name
        for c in table.columns
        if c.name not in _NOT_TEXT and isinstance(c.type, types.JSON | types.String)
    ]


class KindPrivacy:
    """A kind's redaction and no-text policy. Immutable; one per drain."""

    def __init__(
        self,
        kind: Kind,
        redactor: redaction.KindRedactor | None,
        *,
        no_text_modes: Iterable[str] = (),
        no_text_models: Iterable[str] = (),
        keep_raw: bool = False,
    ) -> None:
        self.kind = kind.name
        self.redactor = redactor
        self._record_ran = redactor is not None and REDACTED_BY in kind.table.c
        self._bodies = kind.name == "query"
        self._modes = frozenset(no_text_modes)
        self._models = frozenset(no_text_models)
        self._keep_raw = keep_raw
        names = redactor.names if redactor is not None else ()
        # Dead-letter details and unencodable stand-ins are free text: every redactor the
        # kind's rules name runs on them.
        self._text = redaction.builtin_redactor(names)

    @property
    def per_record(self) -> bool:
        """Whether applying this policy needs the decoded record: a redactor, or bodies left
        out by mode or model. When not, only a record's own ``text_stored`` flag matters,
        which :meth:`keeps` checks on a typed row's values."""
        return self.redactor is not None or bool(self._modes or self._models)

    def keeps(self, field: Callable[[str], Any]) -> bool:
        """True when :meth:`apply` would store the record unchanged, judged from its values
        (``field(name)``); only meaningful when not :attr:`per_record`."""
        if self.per_record:
            return False
        if not self._bodies or field(TEXT_STORED) is not False:
            return True
        return all(field(b) is None for b in BODIES)

    def apply(self, payload: Any) -> Any:
        """``payload`` as it may be stored: bodies left out when it says so (``text_stored``
        false) or its mode or model does, configured fields redacted, ``redacted_by`` set.
        Raises Invalid(``redaction_failed``)."""
        if not isinstance(payload, dict):
            return payload  # the codec dead-letters it (not_a_map)
        if self._bodies and (payload.get(TEXT_STORED) is False or self._no_text(payload)):
            payload = {k: v for k, v in payload.items() if k not in BODIES}
            payload[TEXT_STORED] = False
        if self.redactor is None:
            return payload
        try:
            out, ran = self.redactor.apply(payload)
        except redaction.RedactionFailed as exc:
            raise Invalid(REDACTION_FAILED, exc.detail) from None
        if self._record_ran and ran:
            before = out.get(REDACTED_BY)
            had = [n for n in before if isinstance(n, str)] if isinstance(before, list) else []
            out = {**out, REDACTED_BY: sorted({*had, *ran})}
        return out

    def _no_text(self, payload: dict[str, Any]) -> bool:
        if self._modes and payload.get("mode") in self._modes:
            return True
        models = payload.get("model_ids")
        if self._models and isinstance(models, list):
            return any(isinstance(m, str) and m in self._models for m in models)
        return False

    def dead_letter(self, dead: DeadEntry) -> DeadEntry:
        """``dead`` as it may be stored (see the module doc)."""
        original = dead.payload_raw
        detail = self._text(dead.detail)
        if dead.error_code == REDACTION_FAILED:
            return dataclasses.replace(dead, payload=None, detail=detail, **self._raw(original))
        payload = dead.payload
        stand_in = isinstance(payload, dict) and set(payload) == {"reason", "record"}
        if self.redactor is None and (stand_in or not isinstance(payload, dict)):
            return dead  # nothing in this kind is to be redacted, nor bodies to leave out
        if isinstance(payload, dict) and stand_in:
            # an unencodable stand-in: its record is a rendering, free text
            payload = {"reason": payload["reason"], "record": self._text(str(payload["record"]))}
            raw = self._raw(original)
        elif isinstance(payload, dict):
            try:
                payload = self.apply(payload)
            except Invalid:
                payload = None
            if payload is dead.payload:
                return dataclasses.replace(dead, detail=detail)  # nothing to hide
            bodies_gone = isinstance(payload, dict) and payload.get(TEXT_STORED) is False
            replacement = wire.encode(payload) if isinstance(payload, dict) else b""
            raw = self._raw(original, replacement, force=bodies_gone)
        else:
            payload = None
            raw = self._raw(original)
        return dataclasses.replace(dead, payload=payload, detail=detail, **raw)

    def _raw(
        self, original: bytes, replacement: bytes = b"", *, force: bool = False
    ) -> dict[str, Any]:
        """The stored bytes: the original when allowed (never with bodies to leave out)."""
        if (self._keep_raw and not force) or original == replacement:
            return {"payload_raw": original}
        if replacement:
            return {"payload_raw": replacement}
        # Nothing of the content is kept; the whole entry's length and hash keep one dead
        # letter per entry (not one for every failed entry) and mark it unreplayable.
        return {
            "payload_raw": b"",
            "whole_bytes": max(len(original), 1),
            "whole_sha256": hashlib.sha256(original).digest(),
        }


@cache
def _hook(spec: str) -> redaction.TextRedactor:
    return redaction.load_hook(spec)


def for_kind(kind: Kind, settings: Settings) -> KindPrivacy | None:
    """The kind's privacy policy, or None when it has nothing to do (the drain's fast path).
    The query kind always has one: its records may say they carry no bodies.
    Raises RedactionConfigError for rules that name a field the kind does not have."""
    all_redactors = redactors(settings)
    redactor = all_redactors.get(kind.name)
    if redactor is None and kind.name != "query":
        return None
    return KindPrivacy(
        kind,
        redactor,
        no_text_modes=settings.no_text_modes,
        no_text_models=settings.no_text_models,
        keep_raw=settings.dead_letter_keep_raw,
    )


def redactors(settings: Settings) -> dict[str, redaction.KindRedactor]:
    """Every configured kind's redactor; RedactionConfigError for an unknown kind or field or
    a hook that cannot be imported (checked at worker start by :func:`check`)."""
    rules = settings.redaction_rules()
    if not rules:
        return {}
    hook = _hook(settings.redactor) if settings.redactor else None

    def table_of(name: str) -> Table:
        if name not in kinds:
            raise redaction.RedactionConfigError(
                f"AFTERWRITE_REDACT: unknown kind {name!r} (registered: {', '.join(kinds.names())})"
            )
        return kinds.get(name).table

    expanded: dict[tuple[str, str], frozenset[str]] = {}
    for (name, field), names in rules.items():
        chosen = text_fields(table_of(name)) if field == "*" else [field]
        for f in chosen:
            expanded[(name, f)] = expanded.get((name, f), frozenset()) | names
    return redaction.redactors(expanded, lambda name: _fields_named(table_of(name)), hook)


def check(settings: Settings) -> None:
    """Validate the redaction settings against the registered kinds (at worker start)."""
    redactors(settings)


def erased(payload: Any, entry_id: str, tombstones: dict[str, int]) -> bool:
    """Whether the entry names a user erased after it was recorded (then it is acknowledged
    with its batch, never stored). ``tombstones``: what the stream read loaded with it."""
    return bool(tombstones) and erasure.is_erased(payload, wire.entry_ms(entry_id), tombstones)
