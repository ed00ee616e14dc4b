"""What a usage report is made of: the groupings and one row of figures. Pure, no database,
so the CLI can offer the choices and the chart can draw rows without loading psycopg."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

GroupBy = Literal["model", "user", "day", "mode"]
GROUP_BYS: tuple[GroupBy, ...] = get_args(GroupBy)


@dataclass(frozen=True)
class UsageRow:
    """One group's figures over the window."""

    key: str | None
    """Model id, user id, ``YYYY-MM-DD`` (UTC) or mode; ``None`` for a missing user or mode."""
    calls: int
    avg_latency_ms: float | None
    p95_latency_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
