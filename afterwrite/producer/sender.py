"""Many entries to Redis in one round trip per stream: background flushes and spill replay.

One Lua call per stream adds the entries that fit under ``stream_max_entries`` and returns how
many it added and the stream's length. Against a pipeline of XADDs it has a single reply to
parse and its arguments are packed in C (hiredis), so the flusher thread holds the GIL for a
few microseconds per batch instead of several per entry: the request threads it shares the
interpreter with barely notice it. The cap is exact here (the direct path's is soft). Where
scripting is refused (an ACL without EVALSHA), the sender falls back to XLEN + pipelined XADDs.

``send`` never raises for Redis trouble: it reports per entry SENT, FAILED or OVER_CAP and keeps
the :class:`~afterwrite.producer.gate.Gate` informed. It blocks for at most one socket timeout per
stream (two after a Redis restart, which forgets loaded scripts).
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from itertools import accumulate
from operator import itemgetter
from typing import Any

import redis

from afterwrite.core import wire
from afterwrite.producer.gate import Gate
from afterwrite.producer.records import Outcome

log = logging.getLogger("afterwrite.producer")

REDIS_ERRORS = (redis.RedisError, OSError)

Item = tuple[str, bytes]

CALL_MAX_BYTES = 512 * 1024
"""Entry bytes per Lua call; a larger batch is sent as several calls. Not smaller: while the
application's thread keeps the CPU busy the flusher gets the GIL back about once per switch
interval (5 ms) after each round trip, so its throughput is this many bytes per 5 ms. At
64 KiB a tight loop of 20,000 calls spilled 3,700 entries instead of 1,700 (measured), for
no measurable gain in the callers' latency (fewer page faults in the flusher)."""

# ARGV: the stream cap, the memory high-water mark (a share of maxmemory), then the entries.
# Nothing is added while Redis uses more than that share of its maxmemory: the rest stays free
# for what keeps the pipeline moving (the broker's queues, consumer-group state, the workers'
# slots), so a full Redis never stops the drains that would empty it. INFO memory is read
# here, once per batch or cap check, not once per record.
BATCH_SCRIPT = f"""
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1])
local info = redis.call('INFO', 'memory')
local used = tonumber(string.match(info, 'used_memory:(%d+)')) or 0
local limit = tonumber(string.match(info, 'maxmemory:(%d+)')) or 0
local policy = string.match(info, 'maxmemory_policy:([%w%-]+)') or 'unknown'
local high = 0
if limit > 0 and used > limit * tonumber(ARGV[2]) then
  room = 0
  high = 1
end
local n = #ARGV - 2
if n > room then n = math.max(room, 0) end
for i = 3, n + 2 do
  redis.call('XADD', KEYS[1], '*', '{wire.PAYLOAD_FIELD.decode()}', ARGV[i])
end
return {{n, redis.call('XLEN', KEYS[1]), high, policy}}
"""


def script_args(max_entries: int, high_water: float, entries: list[bytes]) -> list[Any]:
    return [max_entries, repr(high_water), *entries]


def read_reply(gate: Gate, stream: str, reply: Any) -> tuple[int, int]:
    """(added, stream length) from the script's reply; tells the gate about Redis memory."""
    gate.memory(stream, high=bool(int(reply[2])), policy=_text(reply[3]))
    return int(reply[0]), int(reply[1])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def group_by_stream(items: Sequence[Item], prefix: str) -> Mapping[str, Sequence[int]]:
    """Stream key → indexes of its entries in ``items``, in order."""
    kinds = set(map(itemgetter(0), items))
    if len(kinds) == 1:  # the usual batch: no per-entry Python work while holding the GIL
        return {wire.stream_key(prefix, kinds.pop()): range(len(items))}
    groups: dict[str, list[int]] = {}
    for i, (kind, _) in enumerate(items):
        groups.setdefault(wire.stream_key(prefix, kind), []).append(i)
    return groups


def entries_of(items: Sequence[Item], idx: Sequence[int]) -> list[bytes]:
    if len(idx) == len(items):
        return list(map(itemgetter(1), items))
    return [items[i][1] for i in idx]


def settle(
    gate: Gate, stream: str, idx: Sequence[int], added: int, length: int, results: list[Outcome]
) -> None:
    """Record what Redis did with one stream's entries (the first ``added`` went in)."""
    for i in idx[added:]:
        results[i] = Outcome.OVER_CAP
    if added < len(idx):
        gate.over_cap(stream)
    else:
        gate.sent(stream, length)


def split_by_bytes(entries: list[bytes], budget: int) -> list[list[bytes]]:
    """Consecutive runs of ``entries`` of at most ``budget`` bytes each (one entry at least):
    each run is one call, so a call stays well inside the socket timeout and the GIL is
    released between packing runs."""
    ends = list(accumulate(map(len, entries)))
    if not ends or ends[-1] <= budget:
        return [entries]
    runs = []
    start = 0
    base = 0
    while start < len(entries):
        stop = max(start + 1, bisect_right(ends, base + budget, lo=start))
        runs.append(entries[start:stop])
        base = ends[stop - 1]
        start = stop
    return runs


def accepted_prefix(results: Sequence[Outcome]) -> int:
    """How many leading entries Redis took: replay advances its journal only past those."""
    n = 0
    for r in results:
        if r is not Outcome.SENT:
            break
        n += 1
    return n


class BatchSender:
    """Thread-safe (each call uses a connection of the pool on its own)."""

    def __init__(
        self,
        connection: redis.Redis,
        gate: Gate,
        *,
        prefix: str,
        max_entries: int,
        high_water: float = 0.8,
    ):
        self._redis = connection
        self._gate = gate
        self._prefix = prefix
        self._max_entries = max_entries
        self._high_water = high_water
        self._script = connection.register_script(BATCH_SCRIPT)
        self._use_script = True

    def send(self, items: Sequence[Item]) -> list[Outcome]:
        results = [Outcome.SENT] * len(items)
        failed = False
        for stream, idx in group_by_stream(items, self._prefix).items():
            refused = Outcome.FAILED if failed else self._gate.admit(stream)[0]
            if refused is None:
                try:
                    added, length = self.add(stream, entries_of(items, idx))
                except REDIS_ERRORS as exc:
                    refused = self._gate.failed(exc)
                    failed = True
                else:
                    settle(self._gate, stream, idx, added, length, results)
                    continue
            for i in idx:
                results[i] = refused
        return results

    def probe(self) -> bool:
        """Is Redis answering again? One PING, so that replay does not read (and seal) spill
        segments just to find Redis still away."""
        try:
            self._redis.ping()
        except REDIS_ERRORS as exc:
            self._gate.failed(exc)
            return False
        self._gate.reachable()
        return True

    def add(
        self, stream: str, entries: list[bytes], *, one_round_trip: bool = False
    ) -> tuple[int, int]:
        """Add the leading ``entries`` that fit under the cap: (how many, stream length).
        Raises the Redis errors of REDIS_ERRORS (then some may have been added: harmless).

        ``one_round_trip`` (a request thread's cap check): send the script's text with EVAL
        instead of EVALSHA, which after a Redis restart (or the first time) costs two more
        round trips to load the script."""
        total = length = 0
        for run in split_by_bytes(entries, CALL_MAX_BYTES):
            added, length = self._add_run(stream, run, one_round_trip)
            total += added
            if added < len(run):
                break
        return total, length

    def _add_run(self, stream: str, entries: list[bytes], one_round_trip: bool) -> tuple[int, int]:
        if self._use_script:
            try:
                args = script_args(self._max_entries, self._high_water, entries)
                reply: Any = (
                    self._redis.eval(BATCH_SCRIPT, 1, stream, *args)
                    if one_round_trip
                    else self._script(keys=[stream], args=args)
                )
                return read_reply(self._gate, stream, reply)
            except redis.ResponseError as exc:
                if not self._pipeline_works(stream):
                    raise
                self._use_script = False
                log.warning(
                    "redis refuses the batch script (%s); sending pipelined XADDs instead",
                    exc,
                    extra={"action": "no_script"},
                )
        return self._add_pipelined(stream, entries)

    def _pipeline_works(self, stream: str) -> bool:
        try:
            self._redis.xlen(stream)
        except REDIS_ERRORS:
            return False
        return True

    def _add_pipelined(self, stream: str, entries: list[bytes]) -> tuple[int, int]:
        room = max(0, self._max_entries - int(self._redis.xlen(stream)))
        fits = entries[:room]
        pipe = self._redis.pipeline(transaction=False)
        for entry in fits:
            pipe.xadd(stream, {wire.PAYLOAD_FIELD: entry})
        pipe.xlen(stream)
        replies = pipe.execute()
        return len(fits), int(replies[-1])
