"""The query record's fields are declared three times for speed and typing (the table, the
producer's msgspec struct, the ``record_query`` signature); this test ties them together, so a
column added in one place and forgotten in another fails here, not in production."""

from __future__ import annotations

import inspect

import msgspec

from afterwrite.models.query_history import QueryHistory
from afterwrite.producer.api import RecordMethods
from afterwrite.producer.records import QueryRecord, query_record

SERVER_OWNED = {"ingested_at"}
"""Columns only the worker writes: a client can never set them."""

ARGUMENT_FOR = {"id": "event_id"}
"""Where a ``record_query`` argument is named differently from its column."""

SET_BY_AFTERWRITE = {"redacted_by"}
"""Columns producer-side redaction fills in, not an argument."""


def _columns() -> set[str]:
    return {c.name for c in QueryHistory.__table__.columns}


def _struct_fields() -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(QueryRecord)}


def _arguments(func: object) -> set[str]:
    params = inspect.signature(func).parameters  # type: ignore[arg-type]
    return set(params) - {"self"}


def test_the_producer_struct_carries_every_client_column_and_nothing_else() -> None:
    assert _struct_fields() == _columns() - SERVER_OWNED


def test_record_query_takes_every_client_column_and_nothing_else() -> None:
    wanted = {ARGUMENT_FOR.get(c, c) for c in _columns() - SERVER_OWNED - SET_BY_AFTERWRITE}
    assert _arguments(query_record) == wanted
    # record_query(store_text=False) is how a caller says text_stored = false
    assert _arguments(RecordMethods.record_query) == wanted - {"text_stored"} | {"store_text"}


def test_server_owned_columns_have_a_server_default() -> None:
    for name in SERVER_OWNED:
        column = QueryHistory.__table__.columns[name]
        assert column.server_default is not None, name
