"""Collection names: where they are checked, so a name is safe as a directory and a label."""

from __future__ import annotations

import re

_COLLECTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_DOC_ID_CHARS = 512
QUERIES_COLLECTION = "queries"
"""The embedding collection of past questions (doc id: the query's event id), filled when
``AFTERWRITE_EMBED_QUERIES=true`` or ``record_query(..., embed=True)``; ``History.similar``
searches it."""


def check_collection(name: object) -> str:
    """``name`` if it is a valid collection name, else ValueError saying why.

    1-64 characters, letters, digits, ``_``, ``.`` and ``-``, not starting with ``.`` or ``-``:
    safe as one path component of the index directory, in metric labels and in logs."""
    if not isinstance(name, str) or not _COLLECTION.fullmatch(name):
        raise ValueError(
            f"collection {name!r} must be 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_doc_id(doc_id: object) -> str:
    if not isinstance(doc_id, str) or not doc_id or len(doc_id) > MAX_DOC_ID_CHARS:
        raise ValueError(f"doc_id must be a non-empty string of at most {MAX_DOC_ID_CHARS} chars")
    if "\x00" in doc_id:
        raise ValueError("doc_id must not contain NUL")
    return doc_id
