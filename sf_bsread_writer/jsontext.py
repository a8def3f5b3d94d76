"""Strict, bounded JSON from the network: what a body may be before anything looks at it (pure).

Python's ``json.loads`` accepts ``NaN`` and ``Infinity`` (not JSON) and
raises ``RecursionError`` (not ``ValueError``) on deeply nested input, which
an HTTP handler then answers with 500. :func:`loads` turns every such input
into a :class:`JsonError` that says what is wrong, and bounds the nesting of
what it returns, so a value that is stored (REST parameters go into the
file as JSON) can always be written again.
"""
from __future__ import annotations

import json
from typing import Any

__all__ = ["JsonError", "loads", "depth", "MAX_DEPTH"]

#: Deepest nesting a body may have: parameters are a flat object of scalars and small lists.
MAX_DEPTH = 32


class JsonError(ValueError):
    """Not valid (strict) JSON, or nested too deeply; the message says which."""


def _refuse_constant(name: str) -> Any:
    raise JsonError(f"{name} is not a JSON value")


def loads(text: str | bytes | bytearray, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value of ``text``; JsonError for invalid JSON, NaN/Infinity, or nesting beyond ``max_depth``."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except JsonError:
        raise
    except RecursionError:
        raise JsonError("nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise JsonError(str(error)) from None
    if depth(value) > max_depth:
        raise JsonError(f"nested more than {max_depth} levels")
    return value


def depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar is 0); without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        stack.extend((child, level) for child in children)
    return deepest
