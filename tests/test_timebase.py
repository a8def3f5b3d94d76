"""Which clock a message's time comes from (bsread.timebase): pure, fed the receive time."""
from __future__ import annotations

import math

import pytest

from sf_bsread_writer.bsread.timebase import (
    MAX_CLOCK_SKEW,
    MAX_TIMESTAMP_SECONDS,
    TimeBase,
    file_time_base,
    message_time,
    plausible_stamp,
    stamps_to_ns,
)

RECEIVED = 1_700_000_000.0


@pytest.mark.parametrize("source, expected", [
    (RECEIVED - 0.003, (RECEIVED - 0.003, TimeBase.SOURCE)),  # the usual: a few ms of delivery
    (RECEIVED - MAX_CLOCK_SKEW, (RECEIVED - MAX_CLOCK_SKEW, TimeBase.SOURCE)),  # a backlog, at the limit
    (RECEIVED + 1.0, (RECEIVED + 1.0, TimeBase.SOURCE)),  # a source clock slightly ahead
    (0.0, (RECEIVED, TimeBase.RECEIVE)),  # no clock: global_timestamp (0, 0)
    (1.0, (RECEIVED, TimeBase.RECEIVE)),  # a clock that started at boot
    (RECEIVED - 3600.0, (RECEIVED, TimeBase.RECEIVE)),  # a wrong time zone
    (RECEIVED + MAX_CLOCK_SKEW + 0.001, (RECEIVED, TimeBase.RECEIVE)),  # the future is as wrong as the past
    (math.nan, (RECEIVED, TimeBase.RECEIVE)),
    (math.inf, (RECEIVED, TimeBase.RECEIVE)),
    (-5.0, (RECEIVED, TimeBase.RECEIVE)),
], ids=["usual", "backlog", "ahead", "zero", "boot", "time_zone", "future", "nan", "inf", "negative"])
def test_the_source_timestamp_counts_where_it_is_plausible(source, expected):
    assert message_time(source, RECEIVED) == expected


def test_the_skew_is_configurable():
    assert message_time(RECEIVED - 30.0, RECEIVED, max_skew=60.0) == (RECEIVED - 30.0, TimeBase.SOURCE)
    assert message_time(RECEIVED - 30.0, RECEIVED, max_skew=1.0) == (RECEIVED, TimeBase.RECEIVE)


def test_the_files_time_base():
    assert file_time_base(0, 0) is None
    assert file_time_base(5, 0) is TimeBase.SOURCE
    assert file_time_base(0, 5) is TimeBase.RECEIVE
    assert file_time_base(1, 4) is TimeBase.MIXED
    assert [base.value for base in TimeBase] == ["source", "receive", "mixed"]  # the file attribute's words


# -- one policy for "is this (sec, ns) a time at all": the global timestamp and every channel's own


@pytest.mark.parametrize("sec, ns, plausible", [
    (1_700_000_000, 0, True),
    (0, 0, True),  # "not given" is a well-formed stamp (message_time decides what it is worth)
    (MAX_TIMESTAMP_SECONDS, 999_999_999, True),  # still fits int64 nanoseconds
    (MAX_TIMESTAMP_SECONDS + 1, 0, False),
    (2 ** 62, 0, False),  # was accepted, and stored as channel time 0 (int64 ns overflow)
    (-1, 0, False),
    (1, -1, False),
    (1, 10 ** 9, False),
    (math.nan, 0, False),
    (1.5, 0, False),
    (1, 2.0, False),
    (True, 0, False),
    ("1", 0, False),
    (None, 0, False),
], ids=["usual", "not_given", "latest", "beyond_int64_ns", "2^62", "negative_sec", "negative_ns",
        "ns_1e9", "nan", "float_sec", "float_ns", "bool", "string", "none"])
def test_a_stamp_is_plausible_only_as_whole_ns_in_int64(sec, ns, plausible):
    assert plausible_stamp(sec, ns) is plausible


def test_channel_stamps_become_nanoseconds_and_implausible_ones_zero():
    import numpy as np

    sec = np.array([1_700_000_000, 2 ** 62, -1, 5, 0, MAX_TIMESTAMP_SECONDS], dtype="<i8")
    ns = np.array([7, 0, 0, 10 ** 9, 0, 999_999_999], dtype="<i8")
    stamps = stamps_to_ns(sec, ns)
    assert stamps.dtype == np.dtype("<i8")
    assert stamps.tolist() == [1_700_000_000 * 10 ** 9 + 7, 0, 0, 0, 0,
                               MAX_TIMESTAMP_SECONDS * 10 ** 9 + 999_999_999]


def test_channel_stamps_of_a_block_as_the_writer_gives_them():
    """Columns of a block's (sec, ns) pairs, as stored (strided views, either byte order): every one plausible
    and every one not, the same answer."""
    import numpy as np

    for order in "<>":
        stamps = np.array([[1_700_000_000, 5], [0, 0], [MAX_TIMESTAMP_SECONDS, 999_999_999]], dtype=order + "i8")
        assert stamps_to_ns(stamps[:, 0], stamps[:, 1]).tolist() == [
            1_700_000_000 * 10 ** 9 + 5, 0, MAX_TIMESTAMP_SECONDS * 10 ** 9 + 999_999_999]
        stamps[1] = (-3, 0)
        assert stamps_to_ns(stamps[:, 0], stamps[:, 1]).tolist() == [
            1_700_000_000 * 10 ** 9 + 5, 0, MAX_TIMESTAMP_SECONDS * 10 ** 9 + 999_999_999]
