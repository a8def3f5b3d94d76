"""Which clock a message's time comes from (core.timebase): pure, fed the receive time."""
from __future__ import annotations

import math

import pytest

from sf_bsread_writer.core.timebase import MAX_CLOCK_SKEW, TimeBase, file_time_base, message_time

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
