"""Which clock a message's time is read from: the source's, or the receiver's when the source's is implausible (pure).

A time window (``start_now``/``stop_now``) compares a message's time with
the writer's clock. The source's global timestamp is the better time (it
says when the pulse happened, not when a queue delivered it), but some
sources send none (``(0, 0)``) or a clock that is wrong by hours; the
original buffer stamped every message with its receive time, so windows
worked for those sources. Here the source's timestamp is kept where it is
plausible, within :data:`MAX_CLOCK_SKEW` of the time the message was
received, and the receive time stands in where it is not. The buffer
decides once, at ingest (the ring indexes that time; the replay tells a
writer when a message's time is the buffer's: ``replay.messages``); a
writer reading a live stream directly decides the same way with its own
receive time. The file records which base its rows' times came from
(attribute ``time_base``).

Before any of that, a stamp must be a time at all: :func:`plausible_stamp`
is the one answer to "is this ``(sec, ns)`` a time", for the global
timestamp (``bsread.headers`` keeps the message and drops only its time)
and for every channel's own timestamp (stored as 0, "not given", in the
file: :func:`stamps_to_ns`). A stamp that is no time costs the time, never
the values.
"""
from __future__ import annotations

import enum
import math
from typing import Any

import numpy as np

__all__ = ["MAX_CLOCK_SKEW", "MAX_TIMESTAMP_SECONDS", "TimeBase", "message_time", "file_time_base",
           "plausible_stamp", "stamps_to_ns"]

#: The latest second a stamp may name: its nanoseconds still fit an int64 (the file's channel
#: ``timestamp``, year 2262). Beyond, ``sec * 1e9`` wraps (2^62 s was stored as 0).
MAX_TIMESTAMP_SECONDS = (2 ** 63 - 1) // 1_000_000_000 - 1
_NS_PER_SECOND = 1_000_000_000

# Seconds a source's timestamp may differ from the receive time and still be
# believed. Far above network and queueing delays (ms) and a buffer's backlog
# after a hiccup (s), far below a zero clock (decades) or a wrong time zone (hours).
MAX_CLOCK_SKEW = 10.0


class TimeBase(str, enum.Enum):
    """Where a message's time came from (also the file attribute ``time_base``, with ``mixed``)."""

    SOURCE = "source"  # the source's global timestamp
    RECEIVE = "receive"  # the time the buffer (or a --direct writer) received it
    MIXED = "mixed"  # a file whose rows have both


def plausible_stamp(sec: Any, ns: Any) -> bool:
    """True if ``(sec, ns)`` is a time: integers (not bool), ``0 <= sec <= MAX_TIMESTAMP_SECONDS``, ``0 <= ns < 1e9``.

    ``(0, 0)`` is plausible here: it is bsread's "not given", well formed;
    :func:`message_time` decides what a time is worth for selection.
    """
    return (type(sec) is int and type(ns) is int and 0 <= sec <= MAX_TIMESTAMP_SECONDS
            and 0 <= ns < _NS_PER_SECOND)


def stamps_to_ns(sec: np.ndarray, ns: np.ndarray) -> np.ndarray:
    """int64 nanoseconds since the epoch of many stamps at once; 0 ("not given") where not :func:`plausible_stamp`."""
    sec = np.asarray(sec, dtype="<i8")
    ns = np.asarray(ns, dtype="<i8")
    # As unsigned, a negative number is above either bound: two comparisons instead of four (a block
    # write converts every channel's stamps: issue 24's per-channel cost).
    plausible = (sec.view("<u8") <= MAX_TIMESTAMP_SECONDS) & (ns.view("<u8") < _NS_PER_SECOND)
    if plausible.all():
        return sec * _NS_PER_SECOND + ns
    return np.where(plausible, np.where(plausible, sec, 0) * _NS_PER_SECOND + np.where(plausible, ns, 0),
                    0).astype("<i8")


def message_time(source_timestamp: float, received_at: float,
                 max_skew: float = MAX_CLOCK_SKEW) -> tuple[float, TimeBase]:
    """The time to select a message by: its source timestamp if plausible, else ``received_at``.

    Implausible: not given (0), not finite, or more than ``max_skew``
    seconds from the receive time (either way: a clock in the future is as
    wrong as one in the past).
    """
    if source_timestamp > 0 and math.isfinite(source_timestamp) and abs(source_timestamp - received_at) <= max_skew:
        return source_timestamp, TimeBase.SOURCE
    return received_at, TimeBase.RECEIVE


def file_time_base(rows_by_source: int, rows_by_receive: int) -> TimeBase | None:
    """The ``time_base`` of a file from how many of its rows had each; None for a file without rows."""
    if rows_by_receive and rows_by_source:
        return TimeBase.MIXED
    if rows_by_receive:
        return TimeBase.RECEIVE
    if rows_by_source:
        return TimeBase.SOURCE
    return None
