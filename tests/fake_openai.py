"""The fake OpenAI embeddings server as a pytest fixture, plus settings pointing at it.

The server itself is :class:`tests.fake_openai_server.FakeEmbeddingServer` (the benchmark
uses it too). Use the fixture with ``from tests.fake_openai import fake_openai`` in a test module
or a ``pytest_plugins`` entry in the root conftest; or wrap :func:`running` in a fixture of
your own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from afterwrite.core.settings import Settings, load_settings
from tests.fake_openai_server import FakeEmbeddingServer, running

__all__ = ["FakeEmbeddingServer", "fake_openai", "openai_settings", "running"]


def openai_settings(server: FakeEmbeddingServer, **overrides: Any) -> Settings:
    """Settings for the OpenAI provider talking to ``server`` (no developer environment)."""
    values: dict[str, Any] = {
        "embedding_provider": "openai",
        "openai_api_key": server.api_key,
        "openai_base_url": server.base_url,
    }
    values.update(overrides)
    return load_settings({}, **values)


@pytest.fixture
def fake_openai() -> Iterator[FakeEmbeddingServer]:
    """A started fake server, stopped after the test."""
    with running() as server:
        yield server
