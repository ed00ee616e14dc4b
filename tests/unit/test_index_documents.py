"""The documents file of an index version: round trip, damage, caps, filter pairs."""

from __future__ import annotations

import numpy as np
import pytest

from afterwrite.vectorindex import documents as d


def _built() -> d.DocumentsBuilder:
    b = d.DocumentsBuilder(text_max_bytes=8, metadata_max_bytes=64)
    b.add("héllo wörld", '{"lang": "en", "n": 1}')  # 13 bytes: cut
    b.add(None, None)
    b.add("ok", '{"lang": "de", "flag": true}')
    b.add_postings("lang", "en", np.array([0], dtype=np.int32))
    b.add_postings("lang", "de", np.array([2], dtype=np.int32))
    b.add_postings("n", 1, np.array([0], dtype=np.int32))
    b.add_postings("flag", True, np.array([2], dtype=np.int32))
    b.add_postings("score", 0.5, np.array([2], dtype=np.int32))  # a float: not filterable
    return b


def test_round_trip_keeps_texts_metadata_and_postings() -> None:
    docs = d.decode_documents(b"".join(bytes(p) for p in _built().encode()))
    assert docs.count == 3
    assert docs.document(0) == ("héllo w", {"lang": "en", "n": 1}, True, False)
    assert docs.document(1) == ("", None, False, False)
    assert docs.document(2) == ("ok", {"lang": "de", "flag": True}, False, False)
    assert docs.postings("lang", "en").tolist() == [0]
    assert docs.postings("lang", "de").tolist() == [2]
    assert docs.postings("flag", True).tolist() == [2]
    assert docs.postings("flag", 1).tolist() == []  # True and 1 are different values
    assert docs.postings("n", "1").tolist() == []  # and so are 1 and "1"
    assert docs.filter_keys.get("score") is None  # a float value made no posting
    assert docs.filter_keys == {"flag": 1, "lang": 2, "n": 1}


def test_a_damaged_file_is_refused() -> None:
    raw = b"".join(bytes(p) for p in _built().encode())
    for bad in (raw[:-1], b"XXXXXXXX" + raw[8:], raw[:40]):
        with pytest.raises(d.DocumentsError):
            d.decode_documents(bad)


def test_metadata_over_the_cap_keeps_the_filterable_keys_that_fit() -> None:
    meta = {"z": 1, "a": "x" * 300, "lang": "en", "nested": {"k": [1, 2, 3]}}
    kept, cut = d.cap_metadata(meta, 40)
    assert cut
    assert kept == b'{"lang":"en","z":1}'
    assert d.cap_metadata({"a": 1}, 40) == (b'{"a":1}', False)
    assert d.cap_text("ab€", 4) == (b"ab", True)
    assert d.cap_text("ab€", 5) == ("ab€".encode(), False)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ({1: "x"}, "keys are non-empty strings"),
        ({"a": {"$in": [1]}}, "nested filters"),
        ({"a": [{"b": 1}]}, "nested filters"),
        ({"a": []}, "empty list"),
        ({"a": 1.5}, "strings, integers or booleans"),
        ({"a": [None]}, "strings, integers or booleans"),
        ("lang=en", "must be a mapping"),
    ],
)
def test_bad_where(where: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        d.check_where(where)


def test_where_normalised() -> None:
    assert d.check_where(None) is None
    assert d.check_where({}) is None
    assert d.check_where({"a": "x", "b": [1, True]}) == {"a": ["x"], "b": [1, True]}
    assert d.check_where({"a": ["x", "x", 1, 1]}) == {"a": ["x", 1]}
