"""Which record kinds exist, by name: what a producer may record, without the models.

The models layer (``afterwrite.models.registry``) maps each kind to the table that stores it and
adds every kind it registers here. A producer checks names against this set only, so a web
process that records loads neither SQLAlchemy nor the models. The built-in kinds are known from
the start; an application's own kinds become known when their module is imported, by the
application itself or through ``AFTERWRITE_IMPORTS`` (see :func:`import_kind_modules`).
Kind names only ever come from here, never from input.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable

from afterwrite.core.errors import ConfigurationError

NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")

BUILTIN = ("embed", "metric", "query")


class UnknownKindError(ConfigurationError, KeyError):
    """A kind name that is not registered (a typo, or input that is not to be trusted)."""

    def __str__(self) -> str:
        return f"unknown record kind {self.args[0]!r}; registered: {', '.join(sorted(_names))}"


_names: set[str] = set(BUILTIN)


def check_name(name: str) -> str:
    """``name`` if it is a valid kind name; ValueError otherwise."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"kind name {name!r} must match {NAME.pattern}")
    return name


def add(name: str) -> None:
    """Make ``name`` known (called by ``register_kind``)."""
    _names.add(check_name(name))


def is_known(name: str) -> bool:
    return name in _names


def require(name: str) -> str:
    """``name`` if it is a known kind; :class:`UnknownKindError` otherwise."""
    if name not in _names:
        raise UnknownKindError(name)
    return name


def names() -> list[str]:
    return sorted(_names)


def import_kind_modules(modules: Iterable[str]) -> None:
    """Import the modules that register an application's own kinds (``AFTERWRITE_IMPORTS``).

    Raises :class:`ConfigurationError` (also an ImportError) naming the setting, so a typo stops
    the process at start.
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise KindImportError(f"AFTERWRITE_IMPORTS: cannot import {name!r}: {exc}") from exc


class KindImportError(ConfigurationError, ImportError):
    """A module named in ``AFTERWRITE_IMPORTS`` cannot be imported."""
