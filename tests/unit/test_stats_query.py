"""The SQL afterwrite.worker.operations.usage builds: fixed fragments, values only as parameters."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from afterwrite.worker.operations.usage import usage_params, usage_query
from afterwrite.worker.operations.usage_rows import GROUP_BYS


@pytest.mark.parametrize("group_by", GROUP_BYS)
def test_values_never_reach_the_statement(group_by: str) -> None:
    hostile = "x'); DROP TABLE query_history; --"
    text = usage_query(group_by, user_id=hostile, model=hostile).as_string()  # type: ignore[arg-type]
    assert hostile not in text
    assert "%(user_id)s" in text
    assert "%(model_json)s::jsonb" in text
    assert "q.created_at >= %(since)s AND q.created_at < %(until)s" in text


def test_model_filter_is_a_containment_on_a_one_element_array() -> None:
    params = usage_params(
        since=datetime(2026, 1, 1, tzinfo=UTC),
        until=datetime(2026, 1, 2, tzinfo=UTC),
        limit=5,
        model='gpt-4o "mini"',
    )
    assert params["model_json"] == '["gpt-4o \\"mini\\""]'
    assert params["user_id"] is None
    text = usage_query("model", model="m").as_string()
    assert "jsonb_array_elements_text(q.model_ids)" in text
    assert "m.value = %(model)s" in text  # only that model's row, not its comparison partners


def test_unknown_grouping_is_refused() -> None:
    with pytest.raises(ValueError, match="group_by must be one of model, user, day, mode"):
        usage_query("session")  # type: ignore[arg-type]
