"""A kind's Redis Stream as a drain sees it: read, acknowledge, reclaim. Thin; no decisions."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import redis

from afterwrite.core import wire


class Entry(msgspec.Struct, frozen=True, gc=False):
    """One stream entry (a msgspec Struct: built in C, thousands per batch, and not tracked by
    the garbage collector: it holds no containers)."""

    id: str
    payload: bytes | None
    """The ``p`` field, or None when the entry has none (not written by an afterwrite client)."""
    deliveries: int = 1


@dataclass(frozen=True)
class PendingEntry:
    id: str
    consumer: str
    idle_ms: int
    deliveries: int


def _payload(fields: Any) -> bytes | None:
    """The ``p`` field of an entry's raw field list ``[name, value, …]``."""
    if len(fields) == 2 and fields[0] == wire.PAYLOAD_FIELD:
        return fields[1]  # type: ignore[no-any-return]
    pairs = dict(zip(fields[::2], fields[1::2], strict=False))
    return pairs.get(wire.PAYLOAD_FIELD)


def _raw_entries(raw: Sequence[Any]) -> list[Entry]:
    """Entries of an XREADGROUP reply as the parser gave it (``[[id, [field, value, …]], …]``,
    no per-entry dict built by redis-py)."""
    return [
        Entry(eid.decode(), _payload(fields))
        for eid, fields in raw
        if fields is not None  # deleted while pending
    ]


def _entries(raw: Sequence[Any], deliveries: dict[str, int] | None = None) -> list[Entry]:
    out = []
    for entry_id, fields in raw:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        if fields is None:  # deleted while pending (XCLAIM on Redis < 7 returns these)
            continue
        out.append(Entry(eid, fields.get(wire.PAYLOAD_FIELD), (deliveries or {}).get(eid, 1)))
    return out


_DELETE_IF_IDLE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


def _as_is(reply: Any, **_: Any) -> Any:
    return reply


def is_missing_group(exc: redis.ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


log = logging.getLogger("afterwrite.streams")


class Stream:
    def __init__(self, conn: redis.Redis, key: str, group: str, consumer: str) -> None:
        self.conn = conn
        self.key = key
        self.group = group
        self.consumer = consumer
        # The same connections, without redis-py's reply callback for XREADGROUP: it builds a
        # dict per entry, a fifth of the drain's own CPU per row before this.
        self._reader = redis.Redis(connection_pool=conn.connection_pool)
        self._reader.set_response_callback("XREADGROUP", _as_is)
        self.tombstone_key: str | None = None
        """Set (:meth:`watch_tombstones`): each read also loads this hash, atomically with
        the read of new entries, into :attr:`tombstones`."""
        self.tombstones: dict[str, int] = {}

    def watch_tombstones(self, key: str) -> None:
        """Load the erasure tombstones (``key``, a hash of user hash → epoch ms) with every
        read: no extra round trip, and a batch read after an erasure always sees it."""
        self.tombstone_key = key

    def _keep_tombstones(self, raw: Any) -> None:
        self.tombstones = {
            (k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()
        }

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing. Idempotent.

        The group starts at id 0, so entries recorded before any worker ran are drained too.
        """
        try:
            self.conn.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, count: int, *, own_pending: bool = False) -> list[Entry]:
        """Up to ``count`` entries: new ones, or (``own_pending``) this consumer's unacknowledged
        ones, which a failed batch of this process left behind.

        A group that vanished (Redis restarted without persistence, the database was flushed,
        or an eviction policy removed the stream) is created again, from the stream's start:
        entries still in the stream are read once more, and the idempotent insert stores each
        once. Pending entries died with the group; a batch in flight commits or is re-read.
        """
        try:
            return self._read(count, own_pending=own_pending)
        except redis.ResponseError as exc:
            if not is_missing_group(exc):
                raise
        log.warning(
            "the consumer group of %s was gone (Redis restarted without persistence, flushed, "
            "or evicted it); created it again from the stream's start",
            self.key,
            extra={"stream": self.key},
        )
        self.ensure_group()
        return self._read(count, own_pending=own_pending)

    def _read(self, count: int, *, own_pending: bool) -> list[Entry]:
        if own_pending:
            return self._own_pending(count)
        if self.tombstone_key is None:
            reply: Any = self._reader.xreadgroup(
                self.group, self.consumer, {self.key: ">"}, count=count
            )
        else:
            # MULTI/EXEC: no erasure can fall between the tombstones read and the entries
            pipe = self._reader.pipeline(transaction=True)
            pipe.hgetall(self.tombstone_key)
            pipe.xreadgroup(self.group, self.consumer, {self.key: ">"}, count=count)
            tombstones, reply = pipe.execute(raise_on_error=False)
            if isinstance(reply, Exception):
                raise reply
            self._keep_tombstones(tombstones)
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3: {stream: [entries]}
            return _raw_entries(next(iter(reply.values())))
        return _raw_entries(reply[0][1])

    def _own_pending(self, count: int) -> list[Entry]:
        """This consumer's unacknowledged entries, re-read without counting a delivery.

        A batch that failed on a transient error is retried, not redelivered: XREADGROUP with an
        explicit id would add one to each entry's delivery count per retry, and after a few
        retries a reclaim (crash, rollout) would dead-letter good entries as too_many_deliveries.
        XCLAIM JUSTID to ourselves resets their idle time without counting a delivery.
        """
        rows: Any = self.conn.xpending_range(
            self.key, self.group, min="-", max="+", count=count, consumername=self.consumer
        )
        if not rows:
            return []
        ids = [r["message_id"] for r in rows]
        pipe = self.conn.pipeline(transaction=False)
        if self.tombstone_key is not None:
            pipe.hgetall(self.tombstone_key)
        pipe.xclaim(self.key, self.group, self.consumer, 0, ids, justid=True)
        for eid in ids:
            pipe.xrange(self.key, eid, eid)
        replies = pipe.execute()
        if self.tombstone_key is not None:
            self._keep_tombstones(replies.pop(0))
        raw = [found[0] for found in replies[1:] if found]
        deliveries = {r["message_id"].decode(): int(r["times_delivered"]) for r in rows}
        return _entries(raw, deliveries)

    def newest(self, count: int) -> list[Entry]:
        """The stream's ``count`` newest entries, whoever holds them (XREVRANGE: no delivery)."""
        raw: Any = self.conn.xrevrange(self.key, "+", "-", count=count)
        return _entries(raw)

    def forget_idle_consumers(self, idle_ms: int) -> list[str]:
        """Delete the group's consumers that hold nothing and were idle longer than
        ``idle_ms``: workers that stopped or were replaced. A live consumer reads every few
        seconds (its idle time resets), and one deleted anyway is recreated by its next read."""
        try:
            consumers: Any = self.conn.xinfo_consumers(self.key, self.group)
        except redis.ResponseError as exc:
            if is_missing_group(exc):
                return []
            raise
        gone = []
        for c in consumers:
            name = c["name"].decode() if isinstance(c["name"], bytes) else str(c["name"])
            idle = int(c["pending"]) == 0 and int(c["idle"]) > idle_ms and name != self.consumer
            # Checked again in one script with the deletion: DELCONSUMER drops a consumer's
            # pending entries for good, and it may have read in between.
            if idle and self.conn.eval(_DELETE_IF_IDLE, 1, self.key, self.group, name):
                gone.append(name)
        return gone

    def ack(self, ids: Sequence[str]) -> None:
        """Acknowledge and delete ``ids`` in one round trip (only after their batch committed)."""
        if not ids:
            return
        pipe = self.conn.pipeline(transaction=True)  # MULTI/EXEC: both or neither
        pipe.xack(self.key, self.group, *ids)
        pipe.xdel(self.key, *ids)
        pipe.execute()

    def pending_idle(self, min_idle_ms: int, count: int) -> list[PendingEntry]:
        """Entries pending longer than ``min_idle_ms`` with any consumer, oldest first.
        Reading them does not count as a delivery. None when the group is gone (the next
        read creates it again)."""
        try:
            rows: Any = self.conn.xpending_range(
                self.key, self.group, min="-", max="+", count=count, idle=min_idle_ms
            )
        except redis.ResponseError as exc:
            if is_missing_group(exc):
                return []
            raise
        return [
            PendingEntry(
                id=r["message_id"].decode(),
                consumer=r["consumer"].decode(),
                idle_ms=int(r["time_since_delivered"]),
                deliveries=int(r["times_delivered"]),
            )
            for r in rows
        ]

    def claim(self, pending: Sequence[PendingEntry], min_idle_ms: int) -> list[Entry]:
        """Take ``pending`` over for this consumer (each claim counts as a delivery). Entries
        another consumer claimed meanwhile (no longer idle) are not returned."""
        if not pending:
            return []
        ids: list[str | bytes | int | memoryview[int]] = [p.id for p in pending]
        if self.tombstone_key is None:
            raw: Any = self.conn.xclaim(self.key, self.group, self.consumer, min_idle_ms, ids)
        else:
            pipe = self.conn.pipeline(transaction=True)
            pipe.hgetall(self.tombstone_key)
            pipe.xclaim(self.key, self.group, self.consumer, min_idle_ms, ids)
            tombstones, raw = pipe.execute()
            self._keep_tombstones(tombstones)
        return _entries(raw, {p.id: p.deliveries + 1 for p in pending})

    def hand_back(self, idle_ms: int) -> int:
        """Mark every entry pending with this consumer as idle for ``idle_ms``, so that any
        reclaim takes them over at once. Does not count as a delivery (``JUSTID``).

        A consumer works on one batch at a time, so what it has pending is exactly what it
        read and has not committed: the batch in flight (and any left by a failed batch).
        """
        handed = 0
        start = "-"
        while True:
            rows: Any = self.conn.xpending_range(
                self.key, self.group, min=start, max="+", count=10_000, consumername=self.consumer
            )
            if not rows:
                return handed
            ids = [r["message_id"] for r in rows]
            self.conn.xclaim(self.key, self.group, self.consumer, 0, ids, idle=idle_ms, justid=True)
            handed += len(ids)
            start = "(" + ids[-1].decode()  # exclusive: continue after the last one
