"""The status page's pure decisions (web/history.py, web/writers.py): the plots' recent past, bounded, and the
writers' rows (progress, rate) from successive status snapshots; fed ``now``, no socket, no clock."""
from __future__ import annotations

import math

from sf_bsread_writer.status import SessionStatus
from sf_bsread_writer.web.history import RateHistory, ValueHistory
from sf_bsread_writer.web.writers import WriterRows, progress

from .test_h5format import channel, message

SPECS = [channel("A", "float64"), channel("B", "int32"), channel("TEXT", "string"), channel("WAVE", "float64", (4,))]


def _message(pulse_id: int, a: float = 0.0):
    return message(pulse_id, SPECS, [a, pulse_id, "text", [1.0, 2.0, 3.0, 4.0]], timestamp=1000.0 + pulse_id / 100)


def test_a_sample_per_resolution_of_numeric_scalars_only_the_last_span():
    history = ValueHistory(span=2.0, resolution=0.5, max_channels=10)
    for step in range(100):  # 10 s of a 10 Hz feed
        history.add(_message(step, a=step * 0.25), now=step / 10)
    document = history.document(["A", "B", "TEXT", "WAVE", "NOPE"], newest_time=None)
    assert sorted(document["not_held"]) == ["NOPE", "TEXT", "WAVE"]
    a = document["channels"]["A"]
    assert len(a["pulse_id"]) == 4 == history.points  # span / resolution, the oldest overwritten
    assert a["pulse_id"] == [80, 85, 90, 95] and a["value"] == [pulse_id * 0.25 for pulse_id in a["pulse_id"]]
    assert a["timestamp"] == [1000.0 + pulse_id / 100 for pulse_id in a["pulse_id"]]
    assert document["channels"]["B"]["value"] == [80, 85, 90, 95]
    # Only the span before the newest message's time, and NaN as null (JSON has none).
    history.add(_message(500, a=math.nan), now=20.0)
    recent = history.document(["A"], newest_time=1000.0 + 500 / 100)["channels"]["A"]
    assert recent["pulse_id"] == [500] and recent["value"] == [None]


def test_channels_beyond_the_bound_are_not_held_and_removed_ones_are_forgotten():
    history = ValueHistory(span=1.0, resolution=0.5, max_channels=1)
    history.add(_message(1), now=0.0)
    assert history.held("A") and not history.held("B") and history.not_held == 1
    history.add(_message(2), now=1.0)
    assert history.not_held == 1  # counted once per channel
    history.forget_absent(["B"])
    assert not history.held("A")


def test_rate_history_keeps_its_span_and_one_point_per_snapshot():
    rates = RateHistory(span=10.0)
    for second in range(30):
        rates.add(float(second), 50.0, 1e6)
        rates.add(float(second), 99.0, 1e6)  # the same snapshot read twice
    document = rates.document()
    assert document["time"] == [float(second) for second in range(19, 30)]
    assert set(document["messages_per_second"]) == {50.0}


def _session(sent: int, last_pulse_id: int | None, **fields) -> SessionStatus:
    values = dict(session="w1", start_pulse_id=100, start_time=None, stop_pulse_id=199, stop_time=None,
                  cursor_seq=0, last_pulse_id=last_pulse_id, sent=sent, in_flight=0, in_flight_bytes=0, window=64,
                  gaps=0, lost=0, ended=None, label="/data/run.h5")
    values.update(fields)
    return SessionStatus(**values)


def test_writer_rows_progress_by_pulse_id_or_time_and_rate_from_snapshots():
    rows = WriterRows(window=5.0)
    first = rows.rows([_session(10, 109)], now=0.0)[0]
    assert (first.file, first.requested, first.progress, first.rate) == ("/data/run.h5", "100 .. 199", 0.1, None)
    second = rows.rows([_session(60, 159)], now=1.0)[0]
    assert second.progress == 0.6 and second.rate == 50.0
    assert rows.rows([], now=2.0) == [] and rows.rows([_session(70, 169)], now=3.0)[0].rate is None  # forgotten
    assert progress(_session(0, None)) == 0.0
    assert progress(_session(100, 199, ended="stop_pulse_id")) == 1.0
    by_time = _session(5, 7, start_pulse_id=None, stop_pulse_id=None, start_time=10.0, stop_time=20.0, last_time=12.5)
    assert progress(by_time) == 0.25 and rows.rows([by_time], 4.0)[0].requested == "10.0 .. 20.0"
    assert progress(_session(5, 7, stop_pulse_id=None)) is None  # an open range has no end to measure against
