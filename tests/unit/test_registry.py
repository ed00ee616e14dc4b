from __future__ import annotations

import pytest
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from afterwrite.models.registry import Kind, KindRegistry


class Base(DeclarativeBase):
    """Not models.Base: these test tables must not join the migrated schema."""


class _Example(Base):
    __tablename__ = "test_registry_example"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)


class _NoId(Base):
    __tablename__ = "test_registry_no_id"
    key: Mapped[str] = mapped_column(String(36), primary_key=True)


def test_register_and_look_up() -> None:
    registry = KindRegistry()
    registry.register(Kind("example", _Example))
    assert registry.get("example").table.name == "test_registry_example"
    assert "example" in registry
    assert registry.names() == ["example"]


@pytest.mark.parametrize("name", ["Bad", "1x", "a-b", "a b", "x" * 49, "q;drop"])
def test_kind_names_are_restricted(name: str) -> None:
    with pytest.raises(ValueError, match="must match"):
        KindRegistry().register(Kind(name, _Example))


def test_a_kind_needs_an_id_primary_key() -> None:
    with pytest.raises(ValueError, match="needs primary key 'id'"):
        KindRegistry().register(Kind("noid", _NoId))


def test_a_name_cannot_be_taken_twice() -> None:
    registry = KindRegistry()
    registry.register(Kind("example", _Example))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Kind("example", _NoId))
