"""jsontext.py on its own: what a body from the network may be before anything looks at it."""
from __future__ import annotations

import pytest

from sf_bsread_writer.jsontext import MAX_DEPTH, JsonError, depth, loads


@pytest.mark.parametrize("text, why", [
    ("NaN", "NaN"), ('{"a": Infinity}', "Infinity"), ("-Infinity", "Infinity"),
    ("{", "Expecting"), ("", "Expecting"), (b"\xff\xfe", "decode|Expecting"),
    ("[" * 100_000 + "]" * 100_000, "nested"),
    ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"more than {MAX_DEPTH}"),
])
def test_what_is_not_strict_bounded_json_is_a_json_error_that_says_why(text, why):
    with pytest.raises(JsonError, match=why):
        loads(text)


def test_a_json_error_is_a_value_error():
    """Handlers that answer ValueError with 400 answer this too."""
    assert issubclass(JsonError, ValueError)


def test_strict_json_within_the_depth_comes_back_as_is():
    assert loads('{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}
    nested = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert depth(loads(nested)) == MAX_DEPTH
    assert loads("[[1]]", max_depth=2) == [[1]]
    with pytest.raises(JsonError):
        loads("[[1]]", max_depth=1)


def test_depth_needs_no_recursion():
    value: list = []
    for _ in range(200_000):  # far beyond Python's recursion limit
        value = [value]
    assert depth(value) == 200_001
    assert depth(5) == 0 and depth({}) == 1 and depth({"a": {"b": []}}) == 3
