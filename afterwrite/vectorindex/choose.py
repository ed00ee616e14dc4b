"""Which FAISS index a collection gets: a pure function of its size and the budgets.

| vectors                         | index                          | why                          |
|---------------------------------|--------------------------------|------------------------------|
| up to ``exact_max_vectors``     | ``IDMap2,Flat``                | exact; scanning is cheap     |
| more, flat fits the memory      | ``IVF{nlist},Flat``            | ~nprobe/nlist of the scan    |
| more, with a latency budget IVF | ``IDMap2,HNSW32,Flat``         | graph search, log-time       |
|   cannot meet and memory to spare|                               |                              |
| flat over the memory budget     | ``IVF{nlist},SQ8`` / ``,PQ{m}``| 4× / 16-32× smaller          |

``nlist`` is ~√n (between 64 and 65,536): see :func:`ivf_nlist`. IVF keeps ids in its inverted
lists; Flat and HNSW are wrapped in ``IDMap2`` so ids live inside the index file either way (no
side pickle). A factory string from ``AFTERWRITE_INDEX_FACTORY`` overrides the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HNSW_M = 32
FLOAT_BYTES = 4
# Rough scan speed of one core for inner products, used only to compare candidate indexes
# against a latency budget (measured here: ~2-4 GFLOP/s per core on dim 384 batches of 1).
_SCAN_FLOATS_PER_S = 1.5e9


@dataclass(frozen=True)
class Choice:
    factory: str
    reason: str
    nlist: int | None = None

    @property
    def is_ivf(self) -> bool:
        return self.nlist is not None


def flat_bytes(n: int, dim: int) -> int:
    return n * dim * FLOAT_BYTES


def ivf_nlist(n: int) -> int:
    """~√n lists (a power of two between 64 and 65,536, at least 39 training points each).

    The textbook range is 4-16·√n; √n is chosen because adding costs n·nlist·dim (1M vectors
    of 384: ~4·10¹¹ flops at 1,024 lists, seconds on two cores, vs. four times that at 4·√n),
    and the recall target is met by raising nprobe at search time instead."""
    target = math.sqrt(max(n, 1))
    nlist = int(2 ** round(math.log2(max(target, 1))))
    nlist = max(64, min(65_536, nlist))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return max(1, nlist)


def ivf_nprobe_start(nlist: int) -> int:
    """First nprobe tried; the build doubles it until the recall target is met."""
    return min(nlist, max(4, nlist // 64))


def estimated_search_ms(factory: str, n: int, dim: int, nlist: int | None = None) -> float:
    """Order-of-magnitude latency of one query, to compare choices (not a promise)."""
    if factory.startswith("IVF") and nlist:
        scanned = nlist + n * max(1, nlist // 32) / nlist
    elif "HNSW" in factory:
        scanned = 20 * HNSW_M * max(1.0, math.log2(max(n, 2)))
    else:
        scanned = n
    return scanned * dim / _SCAN_FLOATS_PER_S * 1000


def choose_index(
    n: int,
    dim: int,
    *,
    exact_max_vectors: int,
    memory_budget_mb: int,
    latency_budget_ms: float | None = None,
    override: str | None = None,
) -> Choice:
    """The index for ``n`` vectors of ``dim``. Pure: no FAISS, no I/O."""
    if override:
        nlist = _nlist_of(override)
        return Choice(override, "factory override (AFTERWRITE_INDEX_FACTORY)", nlist)
    if n <= exact_max_vectors:
        return Choice("IDMap2,Flat", f"{n:,} vectors <= {exact_max_vectors:,}: exact search")
    budget = memory_budget_mb * 1024 * 1024
    nlist = ivf_nlist(n)
    flat = flat_bytes(n, dim)
    if flat > budget:
        if n * dim <= budget:  # one byte per dimension
            return Choice(
                f"IVF{nlist},SQ8",
                f"flat vectors ({flat >> 20} MiB) over the {memory_budget_mb} MiB budget: SQ8",
                nlist,
            )
        m = _pq_m(dim, n, budget)
        return Choice(
            f"IVF{nlist},PQ{m}",
            f"flat vectors ({flat >> 20} MiB) over the {memory_budget_mb} MiB budget: PQ{m}",
            nlist,
        )
    ivf = f"IVF{nlist},Flat"
    hnsw_bytes = flat + n * HNSW_M * 2 * 4
    if (
        latency_budget_ms is not None
        and estimated_search_ms(ivf, n, dim, nlist) > latency_budget_ms
        and hnsw_bytes <= budget
    ):
        return Choice(
            f"IDMap2,HNSW{HNSW_M},Flat",
            f"IVF estimated over the {latency_budget_ms} ms latency budget: HNSW",
        )
    return Choice(ivf, f"{n:,} vectors > {exact_max_vectors:,}: IVF, {nlist} lists", nlist)


def _pq_m(dim: int, n: int, budget: int) -> int:
    for m in (64, 48, 32, 24, 16, 8):
        if dim % m == 0 and n * m <= budget:
            return m
    return 8 if dim % 8 == 0 else 1


def _nlist_of(factory: str) -> int | None:
    for raw in factory.split(","):
        part = raw.strip()
        if part.startswith("IVF"):
            digits = "".join(ch for ch in part[3:] if ch.isdigit())
            return int(digits) if digits else None
    return None
