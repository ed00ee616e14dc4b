"""afterwrite's exceptions: one root, one meaning each, and classify reads that meaning first."""

from __future__ import annotations

import importlib
import pkgutil

import psycopg
import pytest
import redis

import afterwrite
from afterwrite.core.errors import ConfigurationError, Error, PoisonError, TransientError
from afterwrite.embedders.providers import ProviderConfigError, TransientProviderError
from afterwrite.worker import problems
from afterwrite.worker.errors import BadDeployError, Failure, classify
from afterwrite.worker.index.lock import LockBusy
from afterwrite.worker.ingest.rows import Invalid

MEANINGS = (ConfigurationError, TransientError, PoisonError)


def _afterwrite_exceptions() -> set[type[BaseException]]:
    for info in pkgutil.walk_packages(afterwrite.__path__, "afterwrite."):
        if info.name.startswith("afterwrite.migrations."):
            continue  # Alembic's env and revisions run only under Alembic
        importlib.import_module(info.name)
    found: set[type[BaseException]] = set()
    todo: list[type[BaseException]] = [BaseException]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return {c for c in found if c.__module__.startswith("afterwrite.")}


def test_every_afterwrite_exception_has_exactly_one_meaning() -> None:
    classes = _afterwrite_exceptions()
    assert len(classes) > 20, sorted(c.__qualname__ for c in classes)
    for cls in classes:
        assert issubclass(cls, Error), (
            f"{cls.__module__}.{cls.__qualname__} is not afterwrite.Error"
        )
        meanings = [m for m in MEANINGS if issubclass(cls, m)]
        assert len(meanings) <= 1, f"{cls.__qualname__} means {meanings}"
        if not meanings:  # a family base (ProviderError): each of its members has a meaning
            assert cls.__subclasses__(), f"{cls.__qualname__} has no meaning"


def test_errors_are_importable_from_the_package_root() -> None:
    assert afterwrite.Error is Error
    assert afterwrite.ConfigurationError is ConfigurationError
    assert afterwrite.TransientError is TransientError
    assert afterwrite.PoisonError is PoisonError
    assert issubclass(afterwrite.UnknownKindError, KeyError)  # caught as before the taxonomy


def test_poison_errors_carry_a_stable_code() -> None:
    exc = Invalid("nul_byte", "query: contains a NUL byte")
    assert (exc.code, exc.detail, str(exc)) == (
        "nul_byte",
        "query: contains a NUL byte",
        exc.detail,
    )
    assert isinstance(exc, ValueError)


def _pg(sqlstate: str) -> psycopg.Error:
    return psycopg.errors.lookup(sqlstate)("boom")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        # afterwrite's own bases come first
        (BadDeployError("nearly all invalid"), Failure.CONFIGURATION),
        (ProviderConfigError("401 from the provider"), Failure.CONFIGURATION),
        (TransientProviderError("429 after retries"), Failure.TRANSIENT),
        (LockBusy("held"), Failure.TRANSIENT),
        (Invalid("too_long", "query: too long"), Failure.POISON),
        # redis after a failover, while loading, or full: wait, do not stop
        (redis.exceptions.ReadOnlyError("READONLY replica"), Failure.TRANSIENT),
        (redis.exceptions.TryAgainError("TRYAGAIN"), Failure.TRANSIENT),
        (redis.exceptions.BusyLoadingError("LOADING"), Failure.TRANSIENT),
        (redis.exceptions.OutOfMemoryError("OOM"), Failure.TRANSIENT),
        (redis.exceptions.TimeoutError("timeout"), Failure.TRANSIENT),
        # a refused password or a missing ACL permission: fix the setup
        (redis.exceptions.NoPermissionError("NOPERM"), Failure.CONFIGURATION),
        (redis.exceptions.AuthorizationError("denied"), Failure.CONFIGURATION),
        (redis.exceptions.ResponseError("WRONGTYPE"), Failure.CONFIGURATION),
        (_pg("42703"), Failure.CONFIGURATION),  # undefined column: an old schema
        (_pg("3F000"), Failure.CONFIGURATION),  # invalid schema name
        (_pg("25006"), Failure.TRANSIENT),  # read-only transaction: a standby, for now
        (_pg("53300"), Failure.TRANSIENT),  # too many connections
        (RuntimeError("anything else"), Failure.TRANSIENT),
    ],
)
def test_classify(exc: BaseException, expected: Failure) -> None:
    assert classify(exc) is expected


def test_the_configuration_pause_grows_to_five_minutes() -> None:
    pauses = [problems.pause_s(n) for n in range(1, 10)]
    assert pauses[:4] == [30.0, 60.0, 120.0, 240.0]
    assert pauses[-1] == problems.MAX_PAUSE_S == 300.0
    assert pauses == sorted(pauses)
