"""Working with the dead-letter store: list, show, replay, purge.

Replay re-validates each entry against its kind's table as it is now (the schema or the
validator may have been fixed since) and re-adds the exact original bytes to the kind's stream;
only then is the dead letter deleted. Re-adding an entry twice (a crash between the two steps,
or two replays at once) stores one row, because the event id is the primary key: replay is
idempotent. An entry whose payload was capped (only its head is stored, see
:mod:`afterwrite.worker.ingest.dead_letters`) cannot be replayed and is never re-sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import psycopg
import redis
from psycopg import sql
from psycopg.rows import dict_row

from afterwrite.core import wire
from afterwrite.core.settings import Settings
from afterwrite.models.registry import kinds
from afterwrite.worker.ingest.dead_letters import TRUNCATED_KEY, is_capped
from afterwrite.worker.ingest.rows import Invalid, RowCodec

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """``2026-11-01``, ``2026-11-01T12:00:00+00:00`` or a relative age: ``30m``, ``2h``, ``7d``
    (that long ago). Naive times are UTC."""
    match = _RELATIVE.match(text.strip())
    if match:
        delta = timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
        return (now or datetime.now(UTC)) - delta
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO time nor an age like 30m, 2h, 7d") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Filter:
    kind: str | None = None
    reason: str | None = None
    """Matches ``reason`` (``invalid``, ``rejected``) or ``error_code`` (``nul_byte``, SQLSTATE)."""
    since: datetime | None = None
    until: datetime | None = None
    """On ``last_seen_at``."""
    ids: tuple[int, ...] = ()

    def where(self) -> tuple[sql.Composable, list[Any]]:
        clauses: list[sql.Composable] = []
        params: list[Any] = []
        if self.kind is not None:
            clauses.append(sql.SQL("kind = %s"))
            params.append(self.kind)
        if self.reason is not None:
            clauses.append(sql.SQL("(reason = %s OR error_code = %s)"))
            params += [self.reason, self.reason]
        if self.since is not None:
            clauses.append(sql.SQL("last_seen_at >= %s"))
            params.append(self.since)
        if self.until is not None:
            clauses.append(sql.SQL("last_seen_at < %s"))
            params.append(self.until)
        if self.ids:
            clauses.append(sql.SQL("id = ANY(%s)"))
            params.append(list(self.ids))
        if not clauses:
            return sql.SQL("TRUE"), params
        return sql.SQL(" AND ").join(clauses), params


_SUMMARY = (
    "id, kind, reason, error_code, detail, event_id, delivery_count, first_seen_at, last_seen_at"
)


def list_dead(conn: psycopg.Connection[Any], flt: Filter, limit: int = 50) -> list[dict[str, Any]]:
    """Newest first."""
    where, params = flt.where()
    query = sql.SQL(
        "SELECT " + _SUMMARY + " FROM dead_letters WHERE {} ORDER BY last_seen_at DESC, id DESC "
        "LIMIT %s"
    ).format(where)
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query, [*params, limit]))


def count_dead(conn: psycopg.Connection[Any], flt: Filter) -> int:
    where, params = flt.where()
    row = conn.execute(sql.SQL("SELECT count(*) FROM dead_letters WHERE {}").format(where), params)
    one = row.fetchone()
    return int(one[0]) if one else 0


def show(conn: psycopg.Connection[Any], dead_id: int) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "SELECT " + _SUMMARY + ", entry_id, payload, payload_raw, payload_sha256 "
            "FROM dead_letters WHERE id = %s",
            (dead_id,),
        ).fetchone()
    if row is None:
        return None
    raw = bytes(row.pop("payload_raw"))
    sha = bytes(row.pop("payload_sha256"))
    row["payload_sha256"] = sha.hex()
    row["payload_bytes"] = len(raw)
    row["payload_capped"] = is_capped(raw, sha)
    marker = row["payload"].get(TRUNCATED_KEY) if isinstance(row["payload"], dict) else None
    if row["payload_capped"] and isinstance(marker, dict):
        row["payload_bytes"] = marker.get("bytes")
        row["payload_stored_bytes"] = len(raw)
    row["payload_raw_hex"] = raw[:256].hex() + ("…" if len(raw) > 256 else "")
    return row


@dataclass
class ReplayReport:
    replayed: int = 0
    still_invalid: int = 0
    unknown_kind: int = 0
    capped: int = 0
    """Entries stored capped (only their head): they cannot be replayed."""
    problems: list[dict[str, Any]] = field(default_factory=list)
    """Up to 20 entries that could not be replayed, with why."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "replayed": self.replayed,
            "still_invalid": self.still_invalid,
            "unknown_kind": self.unknown_kind,
            "capped": self.capped,
            "problems": self.problems,
        }


def _batches(
    conn: psycopg.Connection[Any], flt: Filter, size: int
) -> Iterator[list[tuple[int, str, bytes, bytes]]]:
    where, params = flt.where()
    last = 0
    while True:
        rows = conn.execute(
            sql.SQL(
                "SELECT id, kind, payload_raw, payload_sha256 FROM dead_letters"
                " WHERE {} AND id > %s ORDER BY id LIMIT %s"
            ).format(where),
            [*params, last, size],
        ).fetchall()
        if not rows:
            return
        yield [(int(r[0]), str(r[1]), bytes(r[2]), bytes(r[3])) for r in rows]
        last = int(rows[-1][0])


def replay(
    conn: psycopg.Connection[Any],
    r: redis.Redis,
    settings: Settings,
    flt: Filter,
    *,
    dry_run: bool = False,
    chunk: int = 500,
) -> ReplayReport:
    """Re-validate and re-enqueue the matching dead letters; delete the ones re-enqueued.

    ``conn`` must be in autocommit mode: each chunk's deletions commit after its XADDs.
    """
    report = ReplayReport()
    codecs: dict[str, RowCodec] = {}
    for batch in _batches(conn, flt, chunk):
        ready: list[tuple[int, str, bytes]] = []
        for dead_id, kind_name, raw, sha in batch:
            if is_capped(raw, sha):
                report.capped += 1
                _note(
                    report,
                    dead_id,
                    f"cannot be replayed: only the first {len(raw):,} bytes of its payload were"
                    " stored (AFTERWRITE_DEAD_LETTER_MAX_PAYLOAD_BYTES)",
                )
                continue
            if kind_name not in kinds:
                report.unknown_kind += 1
                _note(report, dead_id, f"kind {kind_name!r} is not registered here")
                continue
            codec = codecs.setdefault(kind_name, RowCodec(kinds.get(kind_name).table))
            try:
                payload = wire.decode(raw)
                codec.row(payload)
                validate = kinds.get(kind_name).validate
                if validate is not None:
                    validate(payload)
            except (Invalid, ValueError, msgspec.DecodeError) as exc:
                report.still_invalid += 1
                _note(report, dead_id, f"{getattr(exc, 'code', 'undecodable')}: {exc}")
                continue
            ready.append((dead_id, kind_name, raw))
        if dry_run or not ready:
            report.replayed += len(ready)
            continue
        pipe = r.pipeline(transaction=False)
        for _, kind_name, raw in ready:
            pipe.xadd(wire.stream_key(settings.stream_prefix, kind_name), {wire.PAYLOAD_FIELD: raw})
        pipe.execute()  # raises before anything is deleted if Redis refused
        conn.execute("DELETE FROM dead_letters WHERE id = ANY(%s)", ([d for d, _, _ in ready],))
        report.replayed += len(ready)
    return report


def _note(report: ReplayReport, dead_id: int, why: str) -> None:
    if len(report.problems) < 20:
        report.problems.append({"id": dead_id, "why": why[:300]})


def purge(conn: psycopg.Connection[Any], flt: Filter) -> int:
    """Delete the matching dead letters; returns how many."""
    where, params = flt.where()
    cur = conn.execute(sql.SQL("DELETE FROM dead_letters WHERE {}").format(where), params)
    return max(cur.rowcount, 0)
