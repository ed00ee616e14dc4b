"""Redaction: personal data and secrets in record fields replaced by typed placeholders.

Shared by the worker (which redacts every entry of a configured kind before its row, its dead
letter or its embedding job is written) and, for teams that need it before Redis, the producer
(``AFTERWRITE_PRODUCER_REDACT``). Pure: regular expressions and one optional user hook; no I/O.

Rules come from ``AFTERWRITE_REDACT``: ``kind.field=redactors`` pairs, comma-separated, where
``redactors`` is ``all`` or names joined by ``+`` (``email+card``). A text field is redacted as
a whole; a JSON field (``metadata``, ``retrieval``, ``tags``) has every string inside it
redacted (values, not keys). ``kind.*`` covers every field of the kind the worker knows to hold
text. The built-in redactors:

=========  =============  ==============================================================
name       placeholder    what it finds
=========  =============  ==============================================================
email      ``<EMAIL>``    e-mail addresses
phone      ``<PHONE>``    phone numbers of 9 to 15 digits written with ``+``, parentheses or
                          separators (``+44 20 7946 0958``, ``(555) 123-4567``); a bare digit
                          run (an id, a timestamp) is left alone
card       ``<CARD>``     payment-card numbers of 13 to 19 digits that pass the Luhn check
secret     ``<SECRET>``   API keys (OpenAI/Anthropic ``sk-…``, AWS ``AKIA…``, GitHub ``ghp_…``,
                          Slack ``xox…``, Google ``AIza…``), JWTs, and ``Bearer`` tokens
ip         ``<IP>``       IPv4 and IPv6 addresses
custom     (its own)      ``AFTERWRITE_REDACTOR=module:function``, a ``str -> str`` function
=========  =============  ==============================================================

All built-ins of one field run as one compiled alternation (one pass over the text), so
enabling more of them costs little more than enabling one.
"""

from __future__ import annotations

import importlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from afterwrite.core.errors import ConfigurationError, PoisonError

BUILTIN = ("email", "phone", "card", "secret", "ip")
CUSTOM = "custom"
NAMES = (*BUILTIN, CUSTOM)
PLACEHOLDER = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "card": "<CARD>",
    "secret": "<SECRET>",
    "ip": "<IP>",
}

# Each pattern runs only on texts that pass a cheap test (a substring present, enough digits)
# and starts with a literal or a plain character set where it can: Python's regular
# expressions skip to those in C, but try every position of a pattern that starts with a
# category or a look-behind (10-50x slower on a text without a match).
_SECRET = re.compile(
    r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}"
    r"|\bAKIA[0-9A-Z]{16}\b"
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}"
    r"|\bgithub_pat_[A-Za-z0-9_]{30,}"
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"
    r"|\bAIza[0-9A-Za-z_-]{35}"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r"|(?P<bearer>\b[Bb]earer\s+)[A-Za-z0-9._~+/-]{12,}=*"
)
_SECRET_HINTS = ("k-", "_", "xox", "AKIA", "AIza", "eyJ", "earer")
"""One of these is in every text _SECRET can match (a few scans in C decide most texts)."""
# Anchored on the "@"; the local part before it is taken by hand.
_EMAIL_TAIL = re.compile(r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
# Anchored on their first "." or ":"; the digits before it are taken by hand.
_IPV4_TAIL = re.compile(r"\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}(?![0-9]|\.[0-9])")
_IPV6_TAIL = re.compile(r":[0-9A-Fa-f:]{1,38}")
_DIGITS = re.compile(r"[0-9](?:(?:[ .-]?\(|\)[ .-]?|[ .-])?[0-9]){7,18}(?![0-9A-Za-z_])")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\b")
_DIGIT = "0123456789"
_HEX = frozenset("0123456789abcdefABCDEF")
_WORD = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")


class RedactionFailed(PoisonError, ValueError):
    """A redactor raised on a record: the record is dead-lettered without its content."""


class RedactionConfigError(ConfigurationError, ValueError):
    """``AFTERWRITE_REDACT`` or ``AFTERWRITE_REDACTOR`` is wrong (the message names which)."""


def luhn_ok(digits: str) -> bool:
    """Whether a string of digits passes the Luhn check (payment-card numbers do)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


TextRedactor = Callable[[str], str]


def _secrets(text: str) -> str:
    for hint in _SECRET_HINTS:
        if hint in text:
            break
    else:
        return text

    def replace(m: re.Match[str]) -> str:
        prefix = m.group("bearer")
        return prefix + "<SECRET>" if prefix else "<SECRET>"

    return _SECRET.sub(replace, text)


def _emails(text: str) -> str:
    if "@" not in text:
        return text
    spans = []
    for m in _EMAIL_TAIL.finditer(text):
        start = m.start()
        while start > 0 and text[start - 1] in _LOCAL:
            start -= 1
        if start < m.start():
            spans.append((start, m.end()))
    return _replaced(text, spans, "<EMAIL>")


def _replaced(text: str, spans: list[tuple[int, int]], placeholder: str) -> str:
    """``text`` with ``spans`` (sorted; an overlapping one is skipped) replaced."""
    if not spans:
        return text
    out: list[str] = []
    at = 0
    for start, end in spans:
        if start >= at:
            out += (text[at:start], placeholder)
            at = end
    out.append(text[at:])
    return "".join(out)


def _ipv4_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in _IPV4_TAIL.finditer(text):
        start = m.start()
        while start > 0 and m.start() - start < 3 and text[start - 1].isdigit():
            start -= 1
        if start == m.start() or (
            start > 0 and (text[start - 1] in _WORD or text[start - 1] == ".")
        ):
            continue
        try:
            ipaddress.IPv4Address(text[start : m.end()])
        except ValueError:
            continue
        spans.append((start, m.end()))
    return spans


def _ipv6_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in _IPV6_TAIL.finditer(text):
        start = m.start()
        while start > 0 and m.start() - start < 4 and text[start - 1] in _HEX:
            start -= 1
        end = m.end()
        if text[start:end].endswith(":") and not text[start:end].endswith("::"):
            end -= 1  # "at 2001:db8::1: done"
        if (start > 0 and text[start - 1] in _WORD | {":"}) or (
            end < len(text) and text[end] in _WORD
        ):
            continue
        try:
            ipaddress.IPv6Address(text[start:end])
        except ValueError:
            continue
        spans.append((start, end))
    return spans


def _ips(text: str) -> str:
    spans = _ipv4_spans(text) if "." in text else []
    if "::" in text or text.count(":") >= 2:
        spans += _ipv6_spans(text)
    return _replaced(text, sorted(spans), "<IP>")


def _numbers(card: bool, phone: bool) -> TextRedactor:
    """Cards and phones share one candidate (digits with spaces, dashes, dots, parentheses);
    the Luhn check, the digit count and the shape decide which, if any, it is."""

    def replace(m: re.Match[str]) -> str:
        text = m.group()
        start = m.start()
        before = m.string[start - 1] if start else ""
        if before in _WORD or _DATE.match(text):
            return text
        digits = "".join(c for c in text if c.isdigit())
        if card and 13 <= len(digits) <= 19 and before != "+" and luhn_ok(digits):
            return "<CARD>"
        # A bare run of digits is an id, a timestamp or an amount more often than a phone
        # number: a phone is written with a +, parentheses or separators.
        if phone and 9 <= len(digits) <= 15 and (len(digits) < len(text) or before in "+("):
            return "<PHONE>"
        return text

    def numbers(text: str) -> str:
        # memchr for each digit, then a count: far cheaper in C than any regex scan
        if not any(d in text for d in _DIGIT) or sum(map(text.count, _DIGIT)) < 9:
            return text
        out = _DIGITS.sub(replace, text)
        # a phone's leading "+" or "(" is outside the match; fold it into the placeholder
        return out.replace("+<PHONE>", "<PHONE>").replace("(<PHONE>", "<PHONE>")

    return numbers


def builtin_redactor(names: Iterable[str]) -> TextRedactor:
    """A ``str -> str`` function applying the built-ins named, most specific first (a key or
    an address must not be half-eaten by "phone")."""
    chosen = frozenset(n for n in names if n in BUILTIN)
    passes: list[TextRedactor] = []
    if "secret" in chosen:
        passes.append(_secrets)
    if "email" in chosen:
        passes.append(_emails)
    if "ip" in chosen:
        passes.append(_ips)
    if chosen & {"card", "phone"}:
        passes.append(_numbers("card" in chosen, "phone" in chosen))

    def redact(text: str) -> str:
        for step in passes:
            text = step(text)
        return text

    return redact


def load_hook(spec: str) -> TextRedactor:
    """The function ``module:function`` names; RedactionConfigError naming the setting."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RedactionConfigError(
            f"AFTERWRITE_REDACTOR: {spec!r} must be module:function, e.g. myapp.pii:redact"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RedactionConfigError(
            f"AFTERWRITE_REDACTOR: cannot import {module_name!r}: {exc}"
        ) from exc
    hook = getattr(module, attr, None)
    if not callable(hook):
        raise RedactionConfigError(f"AFTERWRITE_REDACTOR: {spec!r} is not a callable")
    return hook  # type: ignore[no-any-return]


def parse_rules(rules: Mapping[str, str], *, hook: bool) -> dict[tuple[str, str], frozenset[str]]:
    """``{"query.query": "email+card"}`` → ``{("query", "query"): {"email", "card"}}``.

    ``hook``: whether ``AFTERWRITE_REDACTOR`` is set (``all`` then includes ``custom``, and
    ``custom`` is allowed). Raises ValueError naming the bad pair.
    """
    out: dict[tuple[str, str], frozenset[str]] = {}
    for target, spec in rules.items():
        kind, dot, field = target.partition(".")
        if not dot or not kind or not field or not re.fullmatch(r"[a-z][a-z0-9_]*|\*", field):
            raise ValueError(f"{target!r}: expected kind.field (or kind.*), e.g. query.response")
        names = {n.strip() for n in spec.split("+") if n.strip()}
        if not names:
            raise ValueError(f"{target}: no redactors named (use all, or e.g. email+card)")
        if "all" in names:
            names = (names - {"all"}) | set(BUILTIN) | ({CUSTOM} if hook else set())
        unknown = sorted(names - set(NAMES))
        if unknown:
            raise ValueError(
                f"{target}: unknown redactor(s) {', '.join(unknown)}; known: all, "
                + ", ".join(NAMES)
            )
        if CUSTOM in names and not hook:
            raise ValueError(f"{target}: 'custom' needs AFTERWRITE_REDACTOR=module:function")
        out[(kind, field)] = frozenset(names)
    return out


@dataclass(frozen=True)
class FieldRule:
    field: str
    names: tuple[str, ...]
    """The redactors that run on this field, sorted (what a row's ``redacted_by`` records)."""
    text: TextRedactor


class KindRedactor:
    """The redaction of one kind's payloads: one rule per configured field."""

    def __init__(self, kind: str, rules: Iterable[FieldRule]) -> None:
        self.kind = kind
        self.rules = tuple(rules)
        self.names = tuple(sorted({n for r in self.rules for n in r.names}))

    def apply(self, payload: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """``payload`` with its configured fields redacted (a copy when anything changed) and
        the sorted names of the redactors that ran on it. Raises RedactionFailed when a
        redactor raises (its message is not kept: it may quote the text)."""
        out = payload
        ran: set[str] = set()
        for rule, field in self._targets(payload):
            value = payload.get(field)
            if value is None:
                continue
            try:
                redacted = _redact_value(value, rule.text, 0)
            except RecursionError:
                raise RedactionFailed("redaction_failed", f"{field}: nested too deep") from None
            except Exception as exc:
                raise RedactionFailed(
                    "redaction_failed",
                    f"a redactor raised {type(exc).__name__} on field {field!r} "
                    "(its message is not kept; the record was not stored)",
                ) from None
            ran.update(rule.names)
            if redacted is not value:
                if out is payload:
                    out = dict(payload)
                out[field] = redacted
        return out, sorted(ran)

    def _targets(self, payload: dict[str, Any]) -> Iterable[tuple[FieldRule, str]]:
        for rule in self.rules:
            if rule.field == "*":
                yield from ((rule, f) for f in list(payload) if f not in IDENTIFIERS)
            else:
                yield rule, rule.field


def _redact_value(value: Any, text: TextRedactor, depth: int) -> Any:
    if isinstance(value, str):
        result = text(value)
        if not isinstance(result, str):
            raise TypeError(f"a redactor returned {type(result).__name__}, not str")
        return value if result == value else result
    if depth > 64:
        raise RecursionError
    if isinstance(value, dict):
        changed = {k: _redact_value(v, text, depth + 1) for k, v in value.items()}
        same = all(changed[k] is v for k, v in value.items())
        return value if same else changed
    if isinstance(value, list):
        items = [_redact_value(v, text, depth + 1) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value


def field_rule(field: str, names: frozenset[str], hook: TextRedactor | None) -> FieldRule:
    """The rule running ``names`` on ``field``: built-ins in one pass, then the hook."""
    builtin = builtin_redactor(names)
    if CUSTOM not in names:
        return FieldRule(field, tuple(sorted(names)), builtin)
    if hook is None:
        raise RedactionConfigError(f"{field}: 'custom' needs AFTERWRITE_REDACTOR")
    custom = hook

    def text(s: str) -> str:
        return custom(builtin(s))

    return FieldRule(field, tuple(sorted(names)), text)


IDENTIFIERS = frozenset(
    {"id", "created_at", "user_id", "session_id", "mode", "model_ids", "collection", "doc_id",
     "op", "name", "value", "redacted_by"}
)  # fmt: skip
"""Fields a ``kind.*`` rule leaves alone where the tables are unknown (the producer)."""


def redactors(
    rules: Mapping[tuple[str, str], frozenset[str]],
    fields_of: Callable[[str], Iterable[str]] | None,
    hook: TextRedactor | None,
) -> dict[str, KindRedactor]:
    """One :class:`KindRedactor` per kind named in ``rules``. ``fields_of(kind)`` lists the
    fields a rule may name (the worker knows the tables; raise for an unknown kind); None (the
    producer) accepts any field, and ``kind.*`` then covers every field but
    :data:`IDENTIFIERS`."""
    by_kind: dict[str, dict[str, frozenset[str]]] = {}
    for (kind, field), names in rules.items():
        if fields_of is not None:
            fields = list(fields_of(kind))
            if field not in fields:
                raise RedactionConfigError(
                    f"AFTERWRITE_REDACT: {kind}.{field}: kind {kind!r} has no text field "
                    f"{field!r} (text fields: {', '.join(fields)})"
                )
        have = by_kind.setdefault(kind, {})
        have[field] = have.get(field, frozenset()) | names
    return {
        kind: KindRedactor(kind, [field_rule(f, n, hook) for f, n in sorted(fields.items())])
        for kind, fields in by_kind.items()
    }


def producer_redactors(
    rules: Mapping[tuple[str, str], frozenset[str]], hook_spec: str | None
) -> dict[str, KindRedactor]:
    """The producer's redactors (``AFTERWRITE_PRODUCER_REDACT``): the same rules, no tables."""
    hook = load_hook(hook_spec) if hook_spec else None
    return redactors(rules, None, hook)
