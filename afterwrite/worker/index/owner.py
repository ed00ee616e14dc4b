"""Which database an index directory belongs to.

Indexes are built from one database's ``embeddings`` table and one stream prefix. Two
deployments that share a directory (the default ``.afterwrite/indexes`` is relative to the working
directory, so two databases used from one checkout share it) would publish over each other, and
``afterwrite status`` of one would list the other's indexes. The first publish writes
``<index dir>/OWNER.json`` naming its database and stream prefix; builders of another one refuse
with a :class:`IndexDirectoryTaken` (a configuration error: set ``AFTERWRITE_INDEX_DIR``), and
``status`` lists only the indexes of its own database.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from afterwrite.core.errors import ConfigurationError
from afterwrite.core.settings import Settings

OWNER_FILE = "OWNER.json"


class IndexDirectoryTaken(ConfigurationError):
    """The index directory holds another database's (or stream prefix's) indexes."""


def expected(settings: Settings, dbname: str) -> dict[str, str]:
    """The owner record of this deployment: database name and stream prefix."""
    return {"database": dbname, "stream_prefix": settings.stream_prefix}


def read(root: Path) -> dict[str, Any] | None:
    """The directory's owner record, or None when it has none (or an unreadable one)."""
    try:
        raw = json.loads((Path(root) / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def mismatch(settings: Settings, dbname: str) -> str | None:
    """Why this deployment must not use the index directory, or None when it may."""
    root = settings.index_path
    found = read(root)
    if found is None:
        return None
    want = expected(settings, dbname)
    if all(found.get(k) == v for k, v in want.items()):
        return None
    return (
        f"index directory {root} belongs to database {found.get('database')!r} "
        f"(stream prefix {found.get('stream_prefix')!r}), not {dbname!r} "
        f"(prefix {settings.stream_prefix!r}); set AFTERWRITE_INDEX_DIR to a directory of "
        f"this deployment's own, or remove {root / OWNER_FILE} if that one is gone"
    )


def claim(settings: Settings, dbname: str) -> None:
    """Before writing under the index directory: mark it as this deployment's when unmarked;
    raise :class:`IndexDirectoryTaken` when it is another's."""
    why = mismatch(settings, dbname)
    if why is not None:
        raise IndexDirectoryTaken(why)
    root = settings.index_path
    path = root / OWNER_FILE
    if path.exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    body = json.dumps(expected(settings, dbname), sort_keys=True).encode()
    # O_EXCL: of two builders racing on a new directory one writes, the other re-reads.
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
    why = mismatch(settings, dbname)
    if why is not None:
        raise IndexDirectoryTaken(why)
