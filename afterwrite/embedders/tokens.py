"""Token counts for the OpenAI embeddings API that never under-count.

OpenAI counts with tiktoken (``cl100k_base`` for the embedding models). tiktoken downloads its
BPE file at first use, and this machine cannot reach that host. So: when tiktoken is importable
and an encoding loads without the network (an encoding registered as ``<name>_offline``, or one
already in tiktoken's cache), counts are exact; the attempt runs once per process, in a thread
given :data:`_LOAD_TIMEOUT_S`, so a black-holed download cannot hang a worker. Otherwise the
count is the text's UTF-8 length in bytes: every token of a byte-level BPE covers at least one
byte, so this is a hard upper bound (about 4x the real count for English). It costs packing
density (fewer inputs per request) and truncates inputs over ``max_input_tokens`` *bytes*; it
never makes a request the provider refuses for size.

Truncation keeps a prefix at a token boundary (exact) or at a character boundary within the
byte budget (estimate), preferring the last whitespace in its final 10%.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Sequence
from typing import Any, Protocol

log = logging.getLogger("afterwrite.embedding")
_LOAD_TIMEOUT_S = 2.0
_DEFAULT_ENCODING = "cl100k_base"


class TokenCounter(Protocol):
    exact: bool

    def count(self, texts: Sequence[str]) -> list[int]: ...

    def truncate(self, text: str, max_tokens: int) -> str: ...


class ByteBound:
    """UTF-8 bytes: never fewer than the tokens of any byte-level BPE."""

    exact = False

    def count(self, texts: Sequence[str]) -> list[int]:
        return [len(t.encode("utf-8", "surrogatepass")) for t in texts]

    def truncate(self, text: str, max_tokens: int) -> str:
        data = text.encode("utf-8", "surrogatepass")
        if len(data) <= max_tokens:
            return text
        cut = data[:max_tokens].decode("utf-8", "ignore")  # drops a split trailing character
        space = cut.rfind(" ", int(len(cut) * 0.9))
        return cut[:space] if space > 0 else cut


class Tiktoken:
    """Exact counts with a loaded tiktoken encoding."""

    exact = True

    def __init__(self, encoding: Any) -> None:
        self._encoding = encoding

    def count(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self._encoding.encode_ordinary_batch(list(texts))]

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self._encoding.encode_ordinary(text)
        while len(ids) > max_tokens:
            # decoding a cut through a multi-byte character can re-encode longer: cut again
            text = self._encoding.decode(ids[:max_tokens], errors="ignore")
            ids = self._encoding.encode_ordinary(text)
            max_tokens -= 1
        return str(text)


_counters: dict[str, TokenCounter] = {}
_counters_lock = threading.Lock()


def counter_for(model: str) -> TokenCounter:
    """The best offline counter for ``model``; decided once per process and encoding."""
    tiktoken = _import_tiktoken()
    name = _DEFAULT_ENCODING
    if tiktoken is not None:
        with contextlib.suppress(KeyError):
            name = str(tiktoken.encoding_name_for_model(model))
    with _counters_lock:
        counter = _counters.get(name)
        if counter is None:
            encoding = _load_offline(tiktoken, name) if tiktoken is not None else None
            counter = Tiktoken(encoding) if encoding is not None else ByteBound()
            _counters[name] = counter
        return counter


def _import_tiktoken() -> Any:
    try:
        return importlib.import_module("tiktoken")
    except ImportError:
        return None


def _load_offline(tiktoken: Any, name: str) -> Any:
    found: list[Any] = []

    def load() -> None:
        for candidate in (f"{name}_offline", name):
            try:
                found.append(tiktoken.get_encoding(candidate))
            except Exception as exc:  # unknown name, or the download failed: try the next
                log.debug("tiktoken encoding %s unavailable: %s", candidate, exc)
            else:
                return

    thread = threading.Thread(target=load, name="tiktoken-load", daemon=True)
    thread.start()
    thread.join(_LOAD_TIMEOUT_S)
    return found[0] if found else None
