"""Process memory and CPU for ``afterwrite bench``, read from Linux ``/proc`` (no psutil).

:class:`RssSampler` follows the worker's process tree while it drains (resident set every
:data:`RSS_EVERY_S`, CPU seconds per process); :func:`process_cpu_s` and :func:`system_cpu`
give the CPU time of one process and of the whole machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RSS_EVERY_S = 0.5

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3… of /proc/<pid>/stat (state, ppid, …), or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    return stat.rsplit(")", 1)[1].split()


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` has used so far (fields 14 and 15 of its stat)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def system_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / _CLK_TCK, sum(ticks) / _CLK_TCK


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it, from the parent pids in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat_fields(int(name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class TreeSample:
    """One look at a process tree: resident MiB per pid, CPU seconds so far per pid."""

    rss_mb: dict[int, float]
    cpu_s: dict[int, float]

    @property
    def total_mb(self) -> float:
        return sum(self.rss_mb.values())


def sample_tree(root: int) -> TreeSample | None:
    """VmRSS and CPU time of ``root`` and its descendants; None without /proc.

    RSS is summed over the processes, so pages shared after fork count once per process:
    an upper bound of what the tree holds.
    """
    if not Path("/proc/self/status").exists():
        return None
    rss: dict[int, float] = {}
    cpu: dict[int, float] = {}
    for pid in _descendants(root):
        kb = _rss_kb(pid)
        used = process_cpu_s(pid)
        if kb is not None and used is not None:
            rss[pid] = kb / 1024
            cpu[pid] = used
    return TreeSample(rss, cpu)


@dataclass
class RssSampler:
    """Samples of one process tree, taken by the caller's polling loop every RSS_EVERY_S."""

    root: int
    started: float
    samples: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since ``started``, total MiB)"""
    peak_per_pid: dict[int, float] = field(default_factory=dict)
    cpu_s: dict[int, float] = field(default_factory=dict)
    """Latest CPU seconds per pid (a pid that exits keeps its last reading)."""
    cpu_at: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since ``started``, CPU seconds of the tree so far)"""
    progress: list[tuple[int, float]] = field(default_factory=list)
    """(rows committed, CPU seconds of the tree so far) at each sample the caller counted"""
    next_at: float = 0.0

    def maybe_sample(
        self, now: float, *, force: bool = False, committed: int | None = None
    ) -> float | None:
        if not force and now < self.next_at:
            return None
        self.next_at = now + RSS_EVERY_S
        sample = sample_tree(self.root)
        if sample is None:
            return None
        t = round(now - self.started, 2)
        self.samples.append((t, round(sample.total_mb, 1)))
        for pid, mb in sample.rss_mb.items():
            self.peak_per_pid[pid] = max(self.peak_per_pid.get(pid, 0.0), mb)
        self.cpu_s.update(sample.cpu_s)
        self.cpu_at.append((t, sum(self.cpu_s.values())))
        if committed is not None:
            self.progress.append((committed, self.cpu_at[-1][1]))
        return sample.total_mb

    def report(self, first_commit_at: float | None) -> dict[str, Any]:
        if not self.samples:
            return {"available": False}
        first_rel = None if first_commit_at is None else first_commit_at - self.started
        before = [mb for t, mb in self.samples if first_rel is not None and t <= first_rel]
        cpu_before = [c for t, c in self.cpu_at if first_rel is not None and t <= first_rel]
        return {
            "available": True,
            "start_mb": before[-1] if before else self.samples[0][1],
            "peak_mb": max(mb for _, mb in self.samples),
            "end_mb": self.samples[-1][1],
            "processes": len(self.peak_per_pid),
            "peak_per_process_mb": sorted(round(mb, 1) for mb in self.peak_per_pid.values()),
            "samples": [list(s) for s in self.samples],
            # CPU the worker tree used from its last idle sample to the end of the drain.
            "drain_cpu_s": round(self.cpu_at[-1][1] - (cpu_before[-1] if cpu_before else 0), 2),
            "steady_cpu_us_per_row": self.steady_us_per_row(),
        }

    def steady_us_per_row(self, lo: float = 0.2, hi: float = 0.9) -> float | None:
        """The tree's CPU µs per row while it drained at full speed: between the samples where
        ``lo`` and ``hi`` of the rows had been committed. Unlike ``drain_cpu_s`` per row it
        leaves out fixed costs (pool children loading what their first task needs, the last
        acknowledgements), which a short backlog divides among few rows. None when fewer than
        two samples fall in that span."""
        if not self.progress:
            return None
        total = self.progress[-1][0]
        inside = [(rows, cpu) for rows, cpu in self.progress if lo * total <= rows <= hi * total]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        (r1, c1), (r2, c2) = inside[0], inside[-1]
        return round((c2 - c1) / (r2 - r1) * 1e6, 1)
