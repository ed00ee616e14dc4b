"""The SQL of every history read, built from fixed text and bound parameters. Pure; no I/O.

Each read is one statement served by an index of ``query_history`` (a test checks the plans on a
million rows): a user's pages by ``(user_id, created_at)``, a session by ``(session_id,
created_at, id)``, a mode by ``(mode, created_at)``, a model by the GIN index on ``model_ids``,
everything else by ``created_at``, full text by the GIN indexes on ``search_vector`` and
``response_search_vector``. Pages are
keyset-paginated on ``(created_at, id)``: the condition is written as ``created_at <= key AND
(created_at < key OR id < key_id)`` so its first half is an index bound.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from afterwrite.history import cursor
from afterwrite.history.records import COLUMNS, Hit, Page, record
from afterwrite.models.query_history import SEARCH_CONFIG

MAX_LIMIT = 1000
"""The largest page (or number of hits) one call returns."""

_SELECT = ", ".join(f'"{c}"' for c in COLUMNS)
_SELECT_H = ", ".join(f'h."{c}"' for c in COLUMNS)


@dataclass(frozen=True)
class Plan:
    sql: str
    params: dict[str, Any]
    limit: int
    fingerprint: str = ""

    def page(self, rows: list[tuple[Any, ...]]) -> Page:
        """The page for rows fetched with ``limit + 1``: the extra row only says there is more."""
        items = [record(r) for r in rows[: self.limit]]
        if len(rows) <= self.limit or not items:
            return Page(items, None)
        last = items[-1]
        return Page(items, cursor.encode(self.fingerprint, last.created_at, last.id))

    def hits(self, rows: list[tuple[Any, ...]]) -> list[Hit]:
        """Rows selected as COLUMNS plus a trailing score."""
        return [Hit(record(r), float(r[-1])) for r in rows]


def _limit(limit: int, what: str = "limit") -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"{what} must be an integer from 1 to {MAX_LIMIT}, not {limit!r}")
    return limit


def _aware(name: str, value: datetime | None) -> datetime | None:
    if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
        raise ValueError(f"{name} must be a timezone-aware datetime, not {value!r}")
    return value


def recent(
    *,
    user_id: str | None,
    session_id: str | None,
    mode: str | None,
    model: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    after: str | None,
) -> Plan:
    """Newest first; ``since <= created_at < until``; ``after``: a cursor of the same query."""
    _aware("since", since)
    _aware("until", until)
    if since is not None and until is not None and since >= until:
        raise ValueError(f"since ({since.isoformat()}) must be before until ({until.isoformat()})")
    filters: dict[str, Any] = {
        "user_id": user_id,
        "session_id": session_id,
        "mode": mode,
        "model": model,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
    }
    fp = cursor.fingerprint("recent", filters)
    where: list[str] = []
    params: dict[str, Any] = {"limit": _limit(limit) + 1}
    for column in ("user_id", "session_id", "mode"):
        if filters[column] is not None:
            where.append(f"{column} = %({column})s")
            params[column] = filters[column]
    if model is not None:
        where.append("model_ids @> jsonb_build_array(%(model)s::text)")
        params["model"] = model
    if since is not None:
        where.append("created_at >= %(since)s")
        params["since"] = since
    if until is not None:
        where.append("created_at < %(until)s")
        params["until"] = until
    if after is not None:
        params["key_at"], params["key_id"] = cursor.decode(after, fp)
        where.append("created_at <= %(key_at)s AND (created_at < %(key_at)s OR id < %(key_id)s)")
    sql = f"SELECT {_SELECT} FROM query_history"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC, id DESC LIMIT %(limit)s"
    return Plan(sql, params, limit, fp)


def conversation(session_id: str, *, limit: int, after: str | None) -> Plan:
    """A session's records in the order they were made: ``created_at``, then the event id
    (UUIDv7, increasing per producer process), so records of the same instant keep a stable
    order."""
    if not isinstance(session_id, str):
        raise ValueError(f"session_id must be a string, not {session_id!r}")
    fp = cursor.fingerprint("conversation", {"session_id": session_id})
    params: dict[str, Any] = {"session_id": session_id, "limit": _limit(limit) + 1}
    sql = f"SELECT {_SELECT} FROM query_history WHERE session_id = %(session_id)s"
    if after is not None:
        params["key_at"], params["key_id"] = cursor.decode(after, fp)
        sql += " AND created_at >= %(key_at)s AND (created_at > %(key_at)s OR id > %(key_id)s)"
    sql += " ORDER BY created_at, id LIMIT %(limit)s"
    return Plan(sql, params, limit, fp)


def get(event_id: str) -> Plan | None:
    """None for a string that is not an event id (no such record can exist)."""
    try:
        key = uuid.UUID(str(event_id))
    except ValueError:
        return None
    return Plan(f"SELECT {_SELECT} FROM query_history WHERE id = %(id)s", {"id": key}, 1)


RESPONSE_WEIGHT = 0.5
"""A response's matching words count half as much as the query's in the rank."""


def search_text(text: str, *, user_id: str | None, limit: int) -> Plan:
    """Records whose query, or indexed response (``AFTERWRITE_SEARCH_RESPONSES``), matches
    ``text`` (web-search syntax: words, "a phrase", ``or``, ``-word``), best ``ts_rank_cd``
    first (a response's words weigh ``RESPONSE_WEIGHT``), newest first among equals."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, not {text!r}")
    params: dict[str, Any] = {"text": text, "limit": _limit(limit)}
    # Two GIN indexes, OR-ed by a BitmapOr; the responses' index holds only indexed rows.
    where = "(search_vector @@ q OR response_search_vector @@ q)"
    if user_id is not None:
        where += " AND user_id = %(user_id)s"
        params["user_id"] = user_id
    score = (
        "ts_rank_cd(search_vector, q) + "
        f"{RESPONSE_WEIGHT} * COALESCE(ts_rank_cd(response_search_vector, q), 0)"
    )
    # Rank narrow rows (id, time, score), then read the whole records of the top ones only:
    # sorting every match with its full text cost ~4x more on a million rows.
    order = "score DESC, created_at DESC, id DESC"
    sql = (
        "WITH top AS MATERIALIZED ("
        f"SELECT id, created_at, {score} AS score "
        f"FROM query_history, websearch_to_tsquery('{SEARCH_CONFIG}', %(text)s) AS q "
        f"WHERE {where} ORDER BY {order} LIMIT %(limit)s) "
        f"SELECT {_SELECT_H}, top.score FROM top JOIN query_history h USING (id) "
        f"ORDER BY top.{order.replace(', ', ', top.')}"
    )
    return Plan(sql, params, limit)


def by_ids(ids: list[str], *, user_id: str | None) -> Plan:
    """The records of ``ids`` (any order; the caller orders them), optionally one user's."""
    keys = []
    for i in ids:
        try:
            keys.append(uuid.UUID(i))
        except ValueError:
            continue  # not an event id: no record (a document put in the collection by hand)
    params: dict[str, Any] = {"ids": keys}
    sql = f"SELECT {_SELECT} FROM query_history WHERE id = ANY(%(ids)s)"
    if user_id is not None:
        sql += " AND user_id = %(user_id)s"
        params["user_id"] = user_id
    return Plan(sql, params, max(len(keys), 1))
