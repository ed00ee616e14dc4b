"""Moving a kind's rows out of and into PostgreSQL as JSON Lines (``export`` / ``import``).

File format (one format for every kind, derived from its table like :class:`RowCodec`):

* UTF-8 JSON Lines, no header: one object per row, ordered by ``id``; keys are the table's
  column names in table order, every column present, SQL NULL as ``null``.
* UUIDs as canonical lowercase strings; timestamps as ISO 8601 in UTC with microseconds and
  ``+00:00`` (``2026-11-22T12:00:00.000000+00:00``); integers and booleans as JSON values;
  floats in their shortest exact form (``0.1``, ``1e-300``), so they read back bit for bit.
* JSON columns (and exact ``Numeric`` columns) are written as PostgreSQL's own text for the
  value, and imported from the file's text as it is: numbers keep every digit, even ones a
  double cannot hold. Binary columns are base64 strings.

Export then import (into an empty table) then export gives the same bytes. What cannot be
represented is refused, not changed: a non-finite float or numeric stops the export. Two
values do not survive the trip: a JSON column holding JSON ``null`` comes back as SQL NULL, and
a NULL in a column with a server default comes back as the default (both exactly as the drain
stores a record that leaves the field out).

Import takes the drain's path: :class:`RowCodec` validation (and the kind's ``validate`` hook),
then :func:`write_batch`: COPY → staging → ``INSERT … ON CONFLICT (id) DO NOTHING``, one commit
per batch, rows PostgreSQL refuses bisected out. Lines that can never be stored are
dead-lettered (reason ``invalid``; code ``not_json`` for a line that is not JSON, ``too_deep``
for one nested too deeply to decode, ``line_too_long`` for one over
``AFTERWRITE_IMPORT_MAX_LINE_BYTES``, which :func:`read_lines` never holds whole) with the
line's bytes as ``payload_raw``; importing a file again changes no row. (``dlq replay``
re-sends stream entries and cannot replay these: fix the lines and import them again.)

An export to a file (:func:`exclusive_output`) writes ``FILE.partial``, created private (0600)
with ``O_CREAT|O_EXCL|O_NOFOLLOW``: it never opens a file or follows a link it did not create,
and renames only its own file to ``FILE``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TextIO, cast

import msgspec
import psycopg
from psycopg import sql
from sqlalchemy import Column, Table, types

from afterwrite.core.errors import ConfigurationError, PoisonError
from afterwrite.models.base import writable_columns
from afterwrite.models.registry import Kind, kinds
from afterwrite.worker.ingest.batch_writer import Rejection, write_batch
from afterwrite.worker.ingest.dead_letters import DeadEntry
from afterwrite.worker.ingest.rows import Invalid, RowCodec
from afterwrite.worker.ingest.sql import KindSql, kind_sql

EXPORT_FETCH_ROWS = 1_000
"""Rows per FETCH from the server-side cursor: what an export holds in memory at once."""
TIME_COLUMN = "created_at"
"""``since`` / ``until`` filter on this column."""
MAX_LINE_BYTES = 16 << 20
"""Default of ``AFTERWRITE_IMPORT_MAX_LINE_BYTES``: more than any row the drain accepts."""
_READ_CHUNK = 1 << 20

_encoder = msgspec.json.Encoder()
_decode = msgspec.json.Decoder().decode
_decode_raw = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_NOT_JSON = (msgspec.DecodeError, UnicodeDecodeError)


class TransferError(ConfigurationError, ValueError):
    """A request that cannot be carried out as asked (no time column, a value JSON cannot hold,
    a connection inside a transaction). Nothing was written for the failing part."""


class ImportAborted(TransferError):
    """The first batch was (nearly) all invalid: the wrong ``--kind`` or the wrong file, not bad
    lines. Raised before anything is committed."""


# --- per-column handling ------------------------------------------------------------------
Convert = Callable[[Any], Any]


class Unrepresentable(PoisonError, ValueError):
    """A stored value with no JSON form (NaN, ±Infinity): refused rather than changed."""


def iso_utc(v: datetime) -> str:
    """``2026-11-22T12:00:00.000000+00:00``: always UTC, always microseconds."""
    aware = v if v.tzinfo is not None else v.replace(tzinfo=UTC)  # naive columns hold UTC
    return aware.astimezone(UTC).isoformat(timespec="microseconds")


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise Unrepresentable("unrepresentable", f"{v} has no JSON form")
    return v


def _raw(text: str) -> msgspec.Raw:
    """PostgreSQL's text of a JSON or numeric value, written as it is (a numeric may be NaN)."""
    if text in {"NaN", "Infinity", "-Infinity"}:
        raise Unrepresentable("unrepresentable", f"{text} has no JSON form")
    return msgspec.Raw(text.encode())


def _is_raw(column: Column[Any]) -> bool:
    """Carried as literal text (exact), not as a Python value: JSON and exact numerics."""
    t = column.type
    return isinstance(t, types.JSON) or (
        isinstance(t, types.Numeric) and not isinstance(t, types.Float)
    )


def export_column(column: Column[Any]) -> tuple[sql.Composable, Convert | None]:
    """What to SELECT for ``column`` and how to turn the loaded value into its JSON value."""
    ident = sql.Identifier(column.name)
    t = column.type
    if isinstance(t, types.Uuid):
        return sql.SQL("{}::text").format(ident), None  # PostgreSQL's text is canonical
    if isinstance(t, types.JSON):
        return sql.SQL("{}::text").format(ident), _raw
    if isinstance(t, types.DateTime):
        return ident, iso_utc
    if isinstance(t, types.Float):
        return ident, _finite
    if isinstance(t, types.Numeric):
        return sql.SQL("{}::text").format(ident), _raw
    if isinstance(t, types.Boolean | types.Integer | types.String | types.LargeBinary):
        return ident, None  # bytes become base64 in msgspec's JSON
    raise TransferError(
        f"column {column.table.name}.{column.name}: type {t!r} is not supported by afterwrite"
    )


def _resolve(kind: Kind | str) -> Kind:
    return kinds.get(kind) if isinstance(kind, str) else kind


# --- export -------------------------------------------------------------------------------
def _sink(out: BinaryIO | TextIO) -> Callable[[bytes], object]:
    if isinstance(out, io.TextIOBase):
        text = cast(TextIO, out)
        return lambda chunk: text.write(chunk.decode())
    return cast(BinaryIO, out).write


def export_query(
    table: Table, since: datetime | None = None, until: datetime | None = None
) -> tuple[sql.Composed, list[Any]]:
    """The SELECT an export runs: every column, ``since <= created_at < until``, by id."""
    selects = [export_column(c)[0] for c in writable_columns(table)]
    where: list[sql.Composable] = []
    params: list[Any] = []
    if since is not None or until is not None:
        if TIME_COLUMN not in table.c:
            raise TransferError(
                f"table {table.name} has no {TIME_COLUMN} column: --since/--until cannot filter it"
            )
        for bound, op in ((since, ">="), (until, "<")):
            if bound is not None:
                where.append(sql.SQL("{} " + op + " %s").format(sql.Identifier(TIME_COLUMN)))
                params.append(bound)
    query = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(selects), sql.Identifier(table.name)
    )
    if where:
        query += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
    return query + sql.SQL(" ORDER BY id"), params


def export_rows(
    conn: psycopg.Connection[Any],
    kind: Kind | str,
    out: BinaryIO | TextIO,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write the kind's rows (``since <= created_at < until``) to ``out`` as JSON Lines.

    Read-only; streams through a server-side cursor, so memory stays at one fetch
    (:data:`EXPORT_FETCH_ROWS` rows) whatever the table's size. One snapshot: rows committed
    while it runs are not included. Runs in a transaction of its own on ``conn``, which must
    not be inside one. ``progress(rows_so_far)`` is called after each fetch. Returns the rows
    written; ``out`` is neither flushed nor closed. Raises UnknownKindError, TransferError (a
    value JSON cannot hold, no ``created_at`` column, ``conn`` in a transaction), psycopg.Error.
    """
    _require_idle(conn, "export_rows reads in a transaction of its own")
    k = _resolve(kind)
    table = k.table
    columns = writable_columns(table)
    names = [c.name for c in columns]
    converts = [
        (i, c.name, fn) for i, c in enumerate(columns) if (fn := export_column(c)[1]) is not None
    ]
    query, params = export_query(table, since, until)
    write = _sink(out)
    id_at = names.index("id")
    written = 0
    buf = bytearray()
    with conn.transaction():
        # Timestamps load as UTC, so year 1 and 9999 never cross a date line on conversion.
        conn.execute("SET LOCAL TimeZone TO 'UTC'")
        with conn.cursor(name=f"afterwrite_export_{table.name}") as cur:
            cur.execute(query, params)
            while rows := cur.fetchmany(EXPORT_FETCH_ROWS):
                buf.clear()
                for row in rows:
                    values = list(row)
                    for i, name, fn in converts:
                        if values[i] is not None:
                            try:
                                values[i] = fn(values[i])
                            except Unrepresentable as exc:
                                raise TransferError(
                                    f"{table.name} id {row[id_at]}: {name}: {exc}"
                                ) from None
                    _encoder.encode_into(dict(zip(names, values, strict=True)), buf, -1)
                    buf += b"\n"
                write(bytes(buf))
                written += len(rows)
                if progress is not None:
                    progress(written)
    return written


@contextlib.contextmanager
def exclusive_output(path: Path) -> Iterator[BinaryIO]:
    """Write ``path`` through ``path.partial``, renamed into place only once complete (an
    interrupted export never leaves a truncated file under the real name).

    The partial file is created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and mode 0600: when
    anything already has that name (a link planted there, another export, one that died) the
    export fails with TransferError and touches nothing. Only the file this call created is
    removed on failure or renamed on success; the rename replaces ``path`` itself, never
    what a link there points to."""
    partial = path.with_name(path.name + ".partial")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(partial, flags, 0o600)
    except FileExistsError:
        raise TransferError(
            f"{partial} already exists (another export writing it, one that died, or a file "
            "or link put there by someone else); not touching it: remove it and run again"
        ) from None
    except OSError as exc:
        raise TransferError(f"cannot write {path}: {exc.strerror}") from None
    created = os.fstat(fd)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        now = os.lstat(partial)
        if (now.st_dev, now.st_ino) != (created.st_dev, created.st_ino):
            raise TransferError(f"{partial} was replaced while exporting; {path} not written")
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            now = os.lstat(partial)
            if (now.st_dev, now.st_ino) == (created.st_dev, created.st_ino):
                os.unlink(partial)
        raise


# --- import -------------------------------------------------------------------------------
class LongLine(bytes):
    """The first bytes of a line longer than the limit (from :func:`read_lines`); ``length``
    and ``sha256`` describe the whole line, which was never held in memory."""

    length: int
    sha256: bytes


def read_lines(f: BinaryIO, max_bytes: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """The lines of ``f`` (with their newline), none longer than ``max_bytes`` plus the
    newline held in memory: a longer one is yielded as a :class:`LongLine` of its first
    ``max_bytes + 1`` bytes, the rest read in chunks, hashed and counted (without the
    newline)."""
    while line := f.readline(max_bytes + 1):
        if len(line) <= max_bytes or line.endswith(b"\n"):
            yield line
            continue
        digest, length = hashlib.sha256(line), len(line)
        while (rest := f.readline(_READ_CHUNK)) and not rest.endswith(b"\n"):
            digest.update(rest)
            length += len(rest)
        rest = rest.rstrip(b"\r\n")  # what the dead letter describes: the line, no newline
        digest.update(rest)
        length += len(rest)
        long_line = LongLine(line)
        long_line.length, long_line.sha256 = length, digest.digest()
        yield long_line


@dataclass
class ImportReport:
    """``lines == inserted + duplicates + dead_lettered``; blank lines are not counted."""

    kind: str
    lines: int = 0
    inserted: int = 0
    duplicates: int = 0
    """Ids already in the table, or met earlier in the file (the first occurrence wins)."""
    dead_lettered: int = 0
    batches: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    """Dead letters by error code (``not_json``, ``unknown_field``, a SQLSTATE, …)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class LineCodec:
    """One JSON line → a row ready for COPY, or Invalid; the drain's rules plus the file's."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.codec = RowCodec(kind.table, restoring=True)
        table = kind.table
        self._raw = tuple((i, n) for i, n in enumerate(self.codec.columns) if _is_raw(table.c[n]))
        self._binary = tuple(
            n for n in self.codec.columns if isinstance(table.c[n].type, types.LargeBinary)
        )

    def decode(self, line: bytes) -> Any:
        try:
            return _decode(line)
        except _NOT_JSON as exc:
            raise Invalid("not_json", f"not a JSON line: {exc}") from None
        except RecursionError:
            raise Invalid("too_deep", "JSON nested too deeply to decode") from None

    def row(self, line: bytes, payload: Any) -> tuple[Any, ...]:
        """Validate ``payload`` (``line`` decoded) and return its row, or raise Invalid."""
        if self._binary and isinstance(payload, dict):
            for name in self._binary:
                if isinstance(payload.get(name), str):
                    payload = {**payload, name: _unbase64(name, payload[name])}
        row = self.codec.row(payload)
        if self.kind.validate is not None:
            try:
                self.kind.validate(payload)
            except ValueError as exc:
                code = str(getattr(exc, "code", "rejected_by_validator"))
                raise Invalid(code, str(exc)) from None
        if not self._raw:
            return row
        # The file's own text for exact columns: RowCodec re-encodes through doubles, which
        # would round a numeric that has more digits than a double holds.
        raw = _decode_raw(line)
        out = list(row)
        for i, name in self._raw:
            if out[i] is not None:
                out[i] = bytes(raw[name]).decode()
        return tuple(out)


def _unbase64(name: str, value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise Invalid("bad_base64", f"{name}: not base64") from None


@dataclass
class _Batch:
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    sources: list[tuple[int, bytes, Any]] = field(default_factory=list)
    """(line number, line, payload) of each row, for rows PostgreSQL refuses."""
    dead: list[DeadEntry] = field(default_factory=list)
    lines: int = 0
    duplicates: int = 0


DeadFactory = Callable[[int, bytes, Any, str, str, str], DeadEntry]
"""(line number, line, payload, code, detail, reason) → DeadEntry."""


def _batches(
    codec: LineCodec,
    lines: Iterable[bytes],
    size: int,
    dead: DeadFactory,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[_Batch]:
    """Validated batches of ``size`` non-blank lines; no I/O beyond reading ``lines``."""
    id_at = codec.codec.columns.index("id")
    batch, ids = _Batch(), set[Any]()
    for n, raw_line in enumerate(lines, start=1):
        line = raw_line.rstrip(b"\r\n")
        if not line.strip():
            continue
        batch.lines += 1
        if isinstance(raw_line, LongLine) or len(line) > max_line_bytes:
            batch.dead.append(_too_long(n, raw_line, line, max_line_bytes, dead))
        else:
            _validate(codec, batch, ids, id_at, n, line, dead)
        if batch.lines >= size:
            yield batch
            batch, ids = _Batch(), set()
    if batch.lines:
        yield batch


def _too_long(
    n: int, raw_line: bytes, line: bytes, max_line_bytes: int, dead: DeadFactory
) -> DeadEntry:
    length = raw_line.length if isinstance(raw_line, LongLine) else len(line)
    entry = dead(
        n,
        line,
        None,
        "line_too_long",
        f"line of {length:,} bytes, limit {max_line_bytes:,} (AFTERWRITE_IMPORT_MAX_LINE_BYTES)",
        "invalid",
    )
    if isinstance(raw_line, LongLine):  # only its head was read: describe the whole line
        entry = replace(entry, whole_bytes=raw_line.length, whole_sha256=raw_line.sha256)
    return entry


def _validate(
    codec: LineCodec,
    batch: _Batch,
    ids: set[Any],
    id_at: int,
    n: int,
    line: bytes,
    dead: DeadFactory,
) -> None:
    """Decode and validate one line into ``batch`` (a row, a duplicate, or a dead letter)."""
    payload: Any = None
    try:
        payload = codec.decode(line)
        row = codec.row(line, payload)
    except Invalid as exc:
        batch.dead.append(dead(n, line, payload, exc.code, exc.detail, "invalid"))
        return
    # Within a batch as across batches (ON CONFLICT), the first line with an id wins.
    if row[id_at] in ids:
        batch.duplicates += 1
    else:
        ids.add(row[id_at])
        batch.rows.append(row)
        batch.sources.append((n, line, payload))


def import_rows(
    conn: psycopg.Connection[Any],
    kind: Kind | str,
    lines: Iterable[bytes],
    batch_size: int = 5000,
    progress: Callable[[ImportReport], None] | None = None,
    *,
    source: str = "import",
    guard_ratio: float | None = 0.9,
    guard_min_lines: int = 100,
    max_line_bytes: int = MAX_LINE_BYTES,
    derived: tuple[str, ...] = (),
) -> ImportReport:
    """Store JSON Lines (an export's, or any in its format) as rows of ``kind``; idempotent.

    Every ``batch_size`` lines are written and COMMITTED as one transaction, rows and dead
    letters together (``write_batch``), so an interrupted import leaves whole batches and can
    simply be run again: stored ids are skipped and counted as duplicates, and repeated dead
    letters only bump their ``delivery_count``. ``conn`` must not be inside a transaction.
    Dead letters get ``entry_id = "<source>:<line number>"``. When at least ``guard_ratio`` of
    a first batch of ``guard_min_lines`` or more lines is invalid, raises ImportAborted before
    committing anything (``guard_ratio=None`` turns this off). ``progress(report)`` is called
    after each commit. A line longer than ``max_line_bytes`` (without its newline) is
    dead-lettered as ``line_too_long``; read the file with :func:`read_lines` so such a line
    is never held whole. ``derived`` columns are computed as the drain computes them
    (``derived_columns(table, settings)``). Raises UnknownKindError, TransferError,
    psycopg.Error (transient: the batches committed so far stay).
    """
    _require_idle(conn, "import_rows commits every batch")
    k = _resolve(kind)
    codec = LineCodec(k)
    q = kind_sql(k.table, codec.codec.columns, derived=derived)
    with conn.transaction():
        conn.execute(q.create_staging)
    report = ImportReport(k.name)

    def dead(n: int, line: bytes, payload: Any, code: str, detail: str, reason: str) -> DeadEntry:
        return DeadEntry(k.name, f"{source}:{n}"[-64:], line, payload, reason, code, detail)

    for batch in _batches(codec, lines, batch_size, dead, max_line_bytes):
        _check_guard(report, batch, guard_ratio, guard_min_lines)
        _flush(conn, q, batch, report, dead)
        if progress is not None:
            progress(report)
    return report


def _require_idle(conn: psycopg.Connection[Any], why: str) -> None:
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise TransferError(f"{why}: pass a connection that is not inside a transaction")


def _check_guard(report: ImportReport, batch: _Batch, ratio: float | None, min_lines: int) -> None:
    """Arroyo's DlqLimit, as in the drain: a file that is (nearly) all invalid is the wrong
    file or the wrong kind, and dead-lettering every line of it would only bury the mistake."""
    if ratio is None or report.batches or batch.lines < min_lines:
        return
    if len(batch.dead) >= ratio * batch.lines:
        first = batch.dead[0]
        raise ImportAborted(
            f"{len(batch.dead)} of the first {batch.lines} lines are not valid {report.kind!r} "
            f"rows (line {first.entry_id.rsplit(':', 1)[-1]}: {first.error_code}: "
            f"{first.detail[:200]}); nothing was imported. Is the kind right?"
        )


def _flush(
    conn: psycopg.Connection[Any],
    q: KindSql,
    batch: _Batch,
    report: ImportReport,
    dead: DeadFactory,
) -> None:
    def reject(rejections: Sequence[Rejection]) -> list[DeadEntry]:
        return [
            dead(*batch.sources[r.index], r.sqlstate, r.message, "rejected") for r in rejections
        ]

    result = write_batch(conn, q, batch.rows, batch.dead, reject)
    stored = len(batch.rows) - len(result.rejected)
    report.batches += 1
    report.lines += batch.lines
    report.inserted += result.inserted
    report.duplicates += batch.duplicates + stored - result.inserted
    report.dead_lettered += len(batch.dead) + len(result.rejected)
    for code in [d.error_code for d in batch.dead] + [r.sqlstate for r in result.rejected]:
        report.codes[code or ""] = report.codes.get(code or "", 0) + 1
