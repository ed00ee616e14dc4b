"""A record kind whose validator kills its worker process on a marked entry.

Imported only by worker subprocesses (``AFTERWRITE_IMPORTS=tests.crash_kind``), never by the
test process itself, so the session's schema and cleanup do not know about it.
"""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any

from sqlalchemy import Text, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from afterwrite.models.registry import register_kind
from tests.helpers import CRASH_KIND_KILL_NOTE as KILL_NOTE
from tests.helpers import CRASH_KIND_TABLE as TABLE


def _validate(payload: dict[str, Any]) -> None:
    if payload.get("note") == KILL_NOTE:
        os.kill(os.getpid(), signal.SIGKILL)  # what a segfaulting C extension would do


class _Base(DeclarativeBase):
    pass


@register_kind("crash_probe", validate=_validate)
class CrashProbe(_Base):
    __tablename__ = TABLE
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    note: Mapped[str] = mapped_column(Text)
