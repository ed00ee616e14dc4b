"""afterwrite's exceptions: one root, three meanings.

Every exception afterwrite raises on purpose derives from :class:`Error` through exactly one of
:class:`ConfigurationError` (the setup is wrong: stop loudly, retrying cannot help),
:class:`TransientError` (a service is away or overloaded: retry with backoff) or
:class:`PoisonError` (this data can never be stored: dead-letter it, never retry). Callers
write ``except afterwrite.Error``; the worker's ``classify`` reads the base class first and
looks at third-party exceptions (PostgreSQL SQLSTATEs, redis errors) only after that.

Many of these also derive from the built-in exception callers caught before the taxonomy
existed (``ValueError``, ``KeyError``, ``LookupError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class Error(Exception):
    """Root of every afterwrite exception."""


class ConfigurationError(Error):
    """Wrong settings, schema, credentials or deployment: fix the setup; retrying cannot help."""


class SettingsError(ConfigurationError, ValueError):
    """A setting is missing, malformed, or unknown. The message names the variable.

    Defined here, not with the settings, so that code which only catches it (the CLI) does
    not load pydantic to start."""


SCHEMA_MISSING = "the database has no afterwrite schema (or an old one): run `afterwrite migrate`"
"""What every command, ``health`` and the history reads say, in one line, when the tables they
need are not there (a :class:`ConfigurationError`)."""


class TransientError(Error):
    """A service is unavailable or overloaded for now: retry later, with backoff."""


class PoisonError(Error):
    """One piece of data can never be stored or processed as it is.

    ``code`` is stable and machine-readable (``nul_byte``, ``too_long``, ``not_finite``, …);
    ``detail`` is for people.
    """

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(detail or code)
        self.code = code
        self.detail = detail or code


__all__ = [
    "SCHEMA_MISSING",
    "ConfigurationError",
    "Error",
    "PoisonError",
    "SettingsError",
    "TransientError",
]
