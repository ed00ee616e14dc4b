"""The drain loop: stream entries → validated rows → one committed batch → acknowledged.

Contract of :meth:`KindDrain.process`: it commits the batch's rows and dead letters in one
PostgreSQL transaction and only then acknowledges (XACK + XDEL) every entry of the batch. If
anything fails before the commit, nothing is acknowledged and the entries stay pending, to be
retried by this process's next drain (it re-reads its own pending entries first) or, if the
process died, reclaimed by another worker. Inserts are ``ON CONFLICT (id) DO NOTHING``, so a
retry after a commit whose acknowledgement was lost changes nothing: at-least-once delivery,
exactly-once effect.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from afterwrite.core import erasure, wire
from afterwrite.core.settings import Settings
from afterwrite.models.registry import Kind
from afterwrite.worker.embedding.queries import for_drain as query_jobs_for_drain
from afterwrite.worker.errors import BadDeployError, is_explained
from afterwrite.worker.ingest import privacy
from afterwrite.worker.ingest.batch_writer import Rejection, Row, write_batch
from afterwrite.worker.ingest.database import Database
from afterwrite.worker.ingest.dead_letters import DeadEntry
from afterwrite.worker.ingest.rows import Invalid, RowCodec
from afterwrite.worker.ingest.sql import KindSql, derived_columns, kind_sql
from afterwrite.worker.ingest.streams import Entry, Stream
from afterwrite.worker.ingest.typed import TypedCodec

log = logging.getLogger("afterwrite.drain")


@dataclass(frozen=True)
class BatchReport:
    kind: str
    entries: int
    inserted: int
    duplicates: int
    dead_lettered: int
    bisected: bool
    duration_s: float
    lag_s: float | None
    """Age of the batch's oldest entry when the batch committed."""


@dataclass
class DrainReport:
    kind: str
    batches: int = 0
    entries: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    duration_s: float = 0.0
    max_lag_s: float | None = None
    reports: list[BatchReport] = field(default_factory=list, repr=False)

    def add(self, r: BatchReport) -> None:
        self.batches += 1
        self.entries += r.entries
        self.inserted += r.inserted
        self.duplicates += r.duplicates
        self.dead_lettered += r.dead_lettered
        if r.lag_s is not None:
            self.max_lag_s = max(self.max_lag_s or 0.0, r.lag_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "batches": self.batches,
            "entries": self.entries,
            "inserted": self.inserted,
            "duplicates": self.duplicates,
            "dead_lettered": self.dead_lettered,
            "duration_s": round(self.duration_s, 3),
            "max_lag_s": None if self.max_lag_s is None else round(self.max_lag_s, 3),
        }


def keep_draining(
    *, elapsed_s: float, budget_s: float, last_entries: int, batch_max: int, last_batch_s: float
) -> bool:
    """After a batch: go on while the stream looked full (the batch was full) and another batch
    of the same duration still fits in the time budget. A partial batch means we caught up."""
    return last_entries >= batch_max and elapsed_s + last_batch_s <= budget_s


class KindDrain:
    """Drains one kind's stream for this process. Not thread-safe; one per worker process."""

    def __init__(
        self,
        kind: Kind,
        stream: Stream,
        db: Database,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.kind = kind
        self.stream = stream
        self.db = db
        self.settings = settings
        self.codec = RowCodec(kind.table, max_future_skew_s=settings.max_future_skew_s)
        self.typed = TypedCodec(kind.table, max_future_skew_s=settings.max_future_skew_s)
        self._max_deliveries = settings.max_deliveries
        self.sql: KindSql = kind_sql(
            kind.table, self.codec.columns, derived=derived_columns(kind.table, settings)
        )
        self._id_index = self.codec.columns.index("id")
        # After each commit, before the acknowledgement: past questions to embed, or None.
        self._query_jobs = query_jobs_for_drain(kind, settings, stream.conn, self.codec.columns)
        self.privacy = privacy.for_kind(kind, settings)
        """Redaction and bodies left out (None: nothing to do for this kind)."""
        self._at = {name: i for i, name in enumerate(self.codec.columns)}
        # Whether typed rows can be stored as they are, after a look at a few of their values
        # (see _fast_ready); otherwise every entry takes the checked path.
        reads = kind.validate_reads
        validated = kind.validate is None or (bool(reads) and all(f in self._at for f in reads))
        self._fast = validated and (self.privacy is None or not self.privacy.per_record)
        # users erased (afterwrite erase): loaded with each read; entries acknowledged unstored
        stream.watch_tombstones(erasure.tombstone_key(settings.stream_prefix))
        self._clock = clock
        self._wall = wall_clock
        self._stopping = stopping

    # -- one batch --------------------------------------------------------------------------
    def process(self, entries: Sequence[Entry]) -> BatchReport:
        """Validate, write and commit ``entries``, then acknowledge them all. See module doc.

        A failure that names neither a service nor the setup (``errors.is_explained``: an
        exception from deep inside a library, tied to some entry's content) is not retried
        whole, forever: the batch is bisected until the entry that fails alone is found, and
        that entry is dead-lettered (``unprocessable``) while the others commit.
        """
        try:
            return self._process(entries)
        except Exception as exc:
            if is_explained(exc):
                raise
            if len(entries) == 1:
                return self._dead_letter_alone(entries[0], exc)
            log.warning(
                "batch of %d %s entries failed (%s: %s); bisecting it",
                len(entries),
                self.kind.name,
                type(exc).__name__,
                str(exc)[:200],
                extra={"action": "bisect", "kind": self.kind.name},
            )
        middle = len(entries) // 2
        first = self.process(entries[:middle])
        second = self.process(entries[middle:])
        return _merged(first, second)

    def _dead_letter_alone(self, entry: Entry, exc: BaseException) -> BatchReport:
        detail = f"{type(exc).__name__}: {str(exc)[:500]}"
        dead = [self._dead(entry, _decoded(entry), "unprocessable", detail, reason="invalid")]
        conn = self.db.connection(self.sql)
        try:
            write_batch(conn, self.sql, [], dead, lambda _: [])
        except Exception:
            self.db.discard_if_broken()
            raise
        self.stream.ack([entry.id])
        log.warning(
            "dead-lettered %s entry %s: %s",
            self.kind.name,
            entry.id,
            detail,
            extra={"action": "dead_letter", "kind": self.kind.name},
        )
        return BatchReport(self.kind.name, 1, 0, 0, 1, True, 0.0, self._lag_s([entry]))

    def _process(self, entries: Sequence[Entry]) -> BatchReport:
        started = self._clock()
        rows: list[Row] = []
        row_entries: list[Entry] = []
        dead: list[DeadEntry] = []
        seen: dict[str, bytes | None] = {}
        duplicates = erased = 0
        for entry in entries:
            row = self._row(entry)
            if row is None:
                erased += 1
                continue
            if isinstance(row, DeadEntry):
                dead.append(row)
                continue
            row_id = row[self._id_index]
            if row_id in seen:
                if seen[row_id] != entry.payload:
                    dead.append(
                        self._dead(
                            entry,
                            _decoded(entry),
                            "duplicate_id",
                            f"id {row_id} already in this batch with a different payload",
                            reason="invalid",
                        )
                    )
                else:
                    duplicates += 1
                continue
            seen[row_id] = entry.payload
            # a per-row transform (redaction, handing a column to another stage) goes here
            rows.append(row)
            row_entries.append(entry)

        self._guard(entries, dead)

        def reject(rejections: Sequence[Rejection]) -> list[DeadEntry]:
            return [
                self._dead(
                    row_entries[r.index],
                    _decoded(row_entries[r.index]),
                    r.sqlstate,
                    r.message,
                    reason="rejected",
                )
                for r in rejections
            ]

        conn = self.db.connection(self.sql)
        try:
            result = write_batch(conn, self.sql, rows, dead, reject)
        except Exception:
            self.db.discard_if_broken()
            raise
        if self._query_jobs is not None:
            self._query_jobs.enqueue(rows)
        # Committed: only now may the entries leave the stream.
        self.stream.ack([e.id for e in entries])
        if erased:
            log.info(
                "%d %s entries of erased users acknowledged without being stored",
                erased,
                self.kind.name,
                extra={"action": "erased_entries", "kind": self.kind.name, "entries": erased},
            )
        stored = len(rows) - len(result.rejected)
        report = BatchReport(
            kind=self.kind.name,
            entries=len(entries),
            inserted=result.inserted,
            duplicates=duplicates + stored - result.inserted,
            dead_lettered=len(dead) + len(result.rejected),
            bisected=result.bisected,
            duration_s=self._clock() - started,
            lag_s=self._lag_s(entries),
        )
        log.info(
            "batch kind=%s entries=%d inserted=%d duplicates=%d dead=%d %.3fs lag=%s",
            report.kind,
            report.entries,
            report.inserted,
            report.duplicates,
            report.dead_lettered,
            report.duration_s,
            "-" if report.lag_s is None else f"{report.lag_s:.3f}s",
            extra={"action": "batch", **report.__dict__},
        )
        return report

    def _row(self, entry: Entry) -> tuple[Any, ...] | DeadEntry | None:
        """The entry's row (values in ``codec.columns`` order, validated), its dead letter, or
        None when it names an erased user (acknowledged with the batch, never stored). Never
        raises for content.

        Where a record becomes a row. A per-row transform (redaction, handing a column's text
        to another stage) takes these values where :meth:`_process` adds them to the batch,
        after duplicates within the batch were dropped.

        Most entries take the typed fast path (one msgspec decode with the table's constraints
        checked in C, :mod:`.typed`); any entry it does not accept takes :meth:`_checked`,
        RowCodec's path, which names what is wrong or builds the row from the other forms it
        accepts. Both give the same row for the same entry. Redaction, bodies left out by mode
        or model, erasure tombstones and validators that do not declare what they read need
        the decoded record: while any applies, every entry takes :meth:`_checked`.
        """
        fast = None
        if (
            self._fast
            and entry.payload is not None
            and entry.deliveries <= self._max_deliveries
            and not self.stream.tombstones
        ):
            fast = self.typed.row(entry.payload)
            if fast is not None and self._fast_ready(fast):
                return fast
        return self._checked(entry, fast)

    def _fast_ready(self, row: tuple[Any, ...]) -> bool:
        """A typed row is stored as it is when the privacy policy keeps it unchanged and the
        kind's validator (on the fields it reads) accepts it; else the checked path decides,
        with the dead-letter code."""
        at = self._at
        if self.privacy is not None and not self.privacy.keeps(lambda name: row[at[name]]):
            return False
        if self.kind.validate is not None:
            try:
                self.kind.validate({f: row[at[f]] for f in self.kind.validate_reads})
            except ValueError:
                return False
        return True

    def _checked(
        self, entry: Entry, fast: tuple[Any, ...] | None
    ) -> tuple[Any, ...] | DeadEntry | None:
        """RowCodec's path: every rule, with its dead-letter code; ``fast`` is the typed path's
        row when it had one (then only the kind's validator is left to run)."""
        payload: Any = None
        try:
            if entry.payload is None:
                raise Invalid("no_payload", f"entry has no {wire.PAYLOAD_FIELD!r} field")
            try:
                payload = wire.decode(entry.payload)
            except msgspec.DecodeError as exc:
                raise Invalid("undecodable", f"not a msgpack record: {exc}") from None
            except RecursionError:
                raise Invalid("too_deep", "nested too deep to decode") from None
            stand_in = wire.unencodable_content(payload)
            if stand_in is not None:
                payload = stand_in
                raise Invalid(
                    "unencodable", f"the producer could not encode it: {stand_in['reason']}"
                )
            if privacy.erased(payload, entry.id, self.stream.tombstones):
                return None
            if entry.deliveries > self.settings.max_deliveries:
                raise Invalid(
                    "too_many_deliveries",
                    f"delivered {entry.deliveries} times without being stored "
                    f"(limit {self.settings.max_deliveries}); it may crash its consumer",
                )
            if self.privacy is not None:
                payload = self.privacy.apply(payload)
                row = self.codec.row(payload)
            else:
                row = self.codec.row(payload) if fast is None else fast
            if self.kind.validate is not None:
                self._run_validator(payload)
        except Invalid as exc:
            return self._dead(entry, payload, exc.code, exc.detail, reason="invalid")
        except Exception as exc:
            detail = f"{type(exc).__name__}: {str(exc)[:500]}"
            return self._dead(entry, None, "unprocessable", detail, reason="invalid")
        return row

    # -- the loop ---------------------------------------------------------------------------
    def run(self, budget_s: float) -> DrainReport:
        """Drain until caught up or out of time. First re-process this consumer's own pending
        entries (left by a batch of this process that failed), then new entries."""
        started = self._clock()
        report = DrainReport(self.kind.name)
        n = self.settings.batch_max_entries
        with _gc_paused():
            own = self.stream.read(n, own_pending=True)
            if own:
                report.add(self.process(own))
        while not self._stopping():
            batch_started = self._clock()
            with _gc_paused():
                entries = self.stream.read(n)
                if not entries:
                    break
                report.add(self.process(entries))
            now = self._clock()
            if not keep_draining(
                elapsed_s=now - started,
                budget_s=budget_s,
                last_entries=len(entries),
                batch_max=n,
                last_batch_s=now - batch_started,
            ):
                break
        report.duration_s = self._clock() - started
        return report

    def reclaim(self) -> DrainReport:
        """Take over entries another consumer left pending past ``reclaim_idle_s`` (it died).

        Delivery counts are read before claiming: entries on their first redelivery are
        processed as a batch; entries that already came back once are processed one at a time,
        so an entry that kills its consumer cannot drag its batch-mates to the delivery limit.
        Entries past ``max_deliveries`` are dead-lettered by :meth:`process`.
        """
        started = self._clock()
        report = DrainReport(self.kind.name)
        min_idle_ms = int(self.settings.reclaim_idle_s * 1000)
        pending = self.stream.pending_idle(min_idle_ms, self.settings.batch_max_entries)
        fresh = [p for p in pending if p.deliveries <= 1]
        suspects = [p for p in pending if p.deliveries > 1]
        if fresh:
            claimed = self.stream.claim(fresh, min_idle_ms)
            if claimed:
                report.add(self.process(claimed))
        for p in suspects:
            # One at a time is slow: stop within the budget (the task's soft time limit is
            # drain_budget_s + batch_timeout_s) and leave the rest to the next reclaim.
            if self._stopping() or self._clock() - started >= self.settings.drain_budget_s:
                break
            claimed = self.stream.claim([p], min_idle_ms)
            if claimed:
                report.add(self.process(claimed))
        gone = self.stream.forget_idle_consumers(int(self.settings.consumer_idle_forget_s * 1000))
        if gone:
            log.info(
                "removed %d idle %s consumer(s) with nothing pending: %s",
                len(gone),
                self.kind.name,
                ", ".join(gone),
                extra={"action": "forget_consumers", "kind": self.kind.name},
            )
        report.duration_s = self._clock() - started
        return report

    # -- helpers ----------------------------------------------------------------------------
    def _run_validator(self, payload: dict[str, Any]) -> None:
        assert self.kind.validate is not None
        try:
            self.kind.validate(payload)
        except ValueError as exc:
            raise Invalid(str(getattr(exc, "code", "rejected_by_validator")), str(exc)) from None

    def _guard(self, entries: Sequence[Entry], dead: Sequence[DeadEntry]) -> None:
        """Arroyo's DlqLimit idea: when (nearly) every entry of a sizeable batch does not fit
        the table's shape, the producer or the schema is wrong (a bad deploy), and
        dead-lettering everything would only hide it. Stop instead, committing and
        acknowledging nothing.

        Only the shape counts (:data:`STRUCTURAL`: undecodable, unknown or missing fields):
        bad content (a NUL byte, a size, a number out of range) is one record's problem, and
        end users who send it must not be able to stop a stream. And the guard clears itself
        once valid entries flow: when the stream's newest entries fit the shape, the deploy
        was fixed, and what is left of the bad one is dead-lettered (replayable).
        """
        s = self.settings
        n = len(entries)
        structural = sum(1 for d in dead if d.error_code in STRUCTURAL)
        if n < s.dlq_guard_min_entries or structural < s.dlq_guard_ratio * n:
            return
        if self._newest_fit():
            log.warning(
                "%d of %d %s entries do not fit the table, but the newest entries do: "
                "dead-lettering them (afterwrite dlq list --kind %s)",
                structural,
                n,
                self.kind.name,
                self.kind.name,
                extra={"action": "guard_cleared", "kind": self.kind.name},
            )
            return
        raise BadDeployError(
            f"{structural} of {n} entries of kind {self.kind.name!r} do not fit the table "
            f"(unknown or missing fields, undecodable; guard: {s.dlq_guard_ratio:.0%} of "
            f"batches >= {s.dlq_guard_min_entries}): check the producers' version against "
            "the workers' and run afterwrite migrate. Entries stay in the stream; the guard "
            "clears itself once newer entries fit."
        )

    def _newest_fit(self) -> bool:
        """Whether most of the stream's newest entries fit the table's shape."""
        newest = self.stream.newest(self.settings.dlq_guard_min_entries)
        if not newest:
            return False
        fit = 0
        for entry in newest:
            try:
                payload = wire.decode(entry.payload) if entry.payload is not None else None
                self.codec.row(payload)
            except Invalid as exc:
                fit += exc.code not in STRUCTURAL
            except Exception:
                fit += 1
            else:
                fit += 1
        return fit > len(newest) / 2

    def _dead(
        self, entry: Entry, payload: Any, code: str, detail: str, *, reason: str
    ) -> DeadEntry:
        dead = DeadEntry(
            kind=self.kind.name,
            entry_id=entry.id,
            payload_raw=entry.payload or b"",
            payload=payload,
            reason=reason,
            error_code=code,
            detail=detail,
            deliveries=entry.deliveries,
        )
        return dead if self.privacy is None else self.privacy.dead_letter(dead)

    def _lag_s(self, entries: Sequence[Entry]) -> float | None:
        if not entries:
            return None
        oldest_ms = min(wire.entry_ms(e.id) for e in entries)
        return max(0.0, self._wall() - oldest_ms / 1000)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No automatic garbage collection while a batch is read, turned into rows and written.

    A batch's thousands of lists, tuples, strings and bytes hold no reference cycles (they are
    freed by reference counting), but every 700 of them start a collection, and the older
    generations' collections walk the whole worker process (Celery, SQLAlchemy, psycopg:
    hundreds of thousands of objects): up to ~8 µs of CPU per row with a large heap.
    Collection resumes after each batch."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# Dead-letter codes that say an entry does not fit the table's shape at all (the guard's
# business), as opposed to bad content in a field that exists.
STRUCTURAL = frozenset({"no_payload", "undecodable", "not_a_map", "unknown_field", "missing_field"})


def _decoded(entry: Entry) -> Any:
    try:
        return wire.decode(entry.payload) if entry.payload is not None else None
    except (msgspec.DecodeError, RecursionError):
        return None


def _merged(a: BatchReport, b: BatchReport) -> BatchReport:
    return BatchReport(
        kind=a.kind,
        entries=a.entries + b.entries,
        inserted=a.inserted + b.inserted,
        duplicates=a.duplicates + b.duplicates,
        dead_lettered=a.dead_lettered + b.dead_lettered,
        bisected=True,
        duration_s=a.duration_s + b.duration_s,
        lag_s=max((x for x in (a.lag_s, b.lag_s) if x is not None), default=None),
    )
