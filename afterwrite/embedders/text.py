"""What is embedded and hashed: one normal form of a text, shared by the stage and readers.

The embedding stage embeds and caches ``normalise(text)`` under ``content_hash`` of it, and
``IndexReader`` embeds a text query the same way, so a query and a stored document with the same
words meet the same vector.
"""

from __future__ import annotations

import hashlib
import unicodedata


def normalise(text: str) -> str:
    """What is embedded and hashed: NFC, whitespace runs collapsed, ends stripped. Texts that
    differ only in spacing or Unicode composition share one vector."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def content_hash(normalised: str) -> bytes:
    return hashlib.sha256(normalised.encode("utf-8", "surrogatepass")).digest()
