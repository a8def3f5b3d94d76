"""The archive's pure decisions (archive/records.py): no broker, no socket, no clock."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from sf_bsread_writer.archive.records import (
    ArchivedRecord,
    ArchiveTarget,
    InvalidArchive,
    OriginLog,
    PulseStep,
    RangeCursor,
    StreamSettings,
    decode_payload,
    encode_payload,
    gap_headers,
    lost_pulses,
    marker_range,
    message_headers,
    parse_headers,
    settings_conflicts,
    should_reach_back,
)
from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.bsread.parts import pack
from sf_bsread_writer.replay.messages import Data, End, Gap
from tests.helpers import ROOT


def test_a_message_is_stored_byte_identical_small_and_large_parts():
    frames = build_message(7, [{"name": "A", "type": "uint8", "shape": [400, 400]}, {"name": "B"}],
                           [np.frombuffer(bytes(range(256)) * 625, np.uint8).reshape(400, 400), 1.5], timestamp=(1, 2))
    frames = [bytes(frame) for frame in frames]
    for form in (frames, pack(frames)):
        payload = encode_payload(form)
        parts = decode_payload(payload)
        assert [bytes(part) for part in parts] == frames
        assert parts.layout.n_large == 1  # the image by reference, as the ring holds it


def test_many_channel_messages_round_trip_with_layouts_worked_out_once():
    from sf_bsread_writer.archive.records import PayloadDecoder
    channels = [{"name": f"C{i}", "type": "float64"} for i in range(2000)]
    decoder = PayloadDecoder()
    decoded = []
    for pulse_id in (1, 2):
        frames = [bytes(frame) for frame in build_message(pulse_id, channels, [float(i + pulse_id) for i in range(2000)],
                                                          timestamp=(1, pulse_id))]
        parts = decoder.decode(encode_payload(pack(frames)))
        assert [bytes(part) for part in parts] == frames
        decoded.append(parts)
    assert decoded[0].layout is decoded[1].layout and decoded[0].header is decoded[1].header  # shared, as in the ring


@pytest.mark.parametrize("payload", [
    b"", b"SFBS1\n", b"XXXXX\n\x01\x00\x00\x00" + b"\x00" * 8, b"SFBS1\n\x00\x00\x00\x00",
    b"SFBS1\n\xff\xff\xff\xff", b"SFBS1\n\x01\x00\x00\x00" + struct.pack("<Q", 10) + b"short",
    b"SFBS1\n\x01\x00\x00\x00" + struct.pack("<Q", 2**63) + b"x", b"SFBS1\n\x02\x00\x00\x00" + struct.pack("<Q", 1),
])
def test_a_corrupt_payload_is_refused_with_a_reason(payload):
    with pytest.raises(InvalidArchive):
        decode_payload(payload)


def test_headers_round_trip_and_bad_headers_are_refused():
    assert parse_headers(message_headers(12, 3.25)) == ArchivedRecord("msg", 12, 3.25)
    assert parse_headers(gap_headers(5, 9, 5, "not_archived", 1.0)) == \
        ArchivedRecord("gap", 5, 1.0, 9, 5, "not_archived")
    assert message_headers(12, 3.25)["Nats-Msg-Id"] != message_headers(12, 4.0)["Nats-Msg-Id"]  # a reset repeats ids
    for bad in (None, {}, {"Sf-Pulse-Id": "x", "Sf-Time": "1"}, {"Sf-Pulse-Id": "-1", "Sf-Time": "1"},
                {"Sf-Pulse-Id": str(2**63), "Sf-Time": "1"}, {"Sf-Pulse-Id": "1", "Sf-Time": "nan"},
                {"Sf-Pulse-Id": "1", "Sf-Time": "1", "Sf-Kind": "other"},
                {"Sf-Pulse-Id": "1", "Sf-Time": "1", "Sf-Kind": "gap"}):
        with pytest.raises(InvalidArchive):
            parse_headers(bad)


def test_archive_addresses():
    target = ArchiveTarget.parse("nats://a:4222,nats://b:4223/CAM")
    assert target.servers == ("nats://a:4222", "nats://b:4223") and target.name == "CAM"
    assert target.stream == "sfbs_CAM" and target.message_subject == "sfbs.CAM.msg"
    assert ArchiveTarget.parse("nats://a:4222", "CAM") == ArchiveTarget.parse("nats://a:4222/CAM")
    assert ArchiveTarget.parse(target.url()) == target
    for bad, name in (("tcp://a:1", "X"), ("nats://a/X", None), ("nats://a:1", None), ("nats://a:1/X", "Y"),
                      ("nats://a:1/has.dot", None), ("nats://a:1/has space", None), ("nats://a:x/X", None),
                      ("nats://:1/X", None), ("nats://a:1/" + "n" * 65, None), ("nats://a:1/X>", None)):
        with pytest.raises(InvalidArchive):
            ArchiveTarget.parse(bad, name)


def test_an_existing_stream_is_reused_only_with_the_same_meaning():
    wanted = StreamSettings(("sfbs.A.*",), replicas=3, max_bytes=10)
    assert settings_conflicts(StreamSettings(("sfbs.A.*",), replicas=3, max_bytes=99, max_age=5), wanted) == []
    problems = settings_conflicts(StreamSettings(("x",), replicas=1, storage="memory", discard="new"), wanted)
    assert [problem.split()[0] for problem in problems] == ["subjects", "replicas", "storage", "discard"]


def test_losses_are_counted_in_pulses_of_the_streams_step():
    step = PulseStep()
    for pulse_id in (100, 110, 130, 140):
        step.add(pulse_id)
    assert step.step == 10 and lost_pulses(150, 199, step.step) == 5 and lost_pulses(5, 4, 1) == 0


def test_gap_markers_never_overlap_when_the_ring_repeats_a_notices_first_pulse():
    # The ring's notices while it cannot send to the archiver: (5722, 5807), (5722, 5808), ...
    assert marker_range(5722, 5807, 5721) == (5722, 5807)
    assert marker_range(5722, 5808, 5807) == (5808, 5808)
    assert marker_range(5722, None, 5808) == (5809, None)
    assert marker_range(None, 10, None) == (None, 10)


def record(pulse_id: int, time: float | None = None) -> ArchivedRecord:
    return ArchivedRecord("msg", pulse_id, float(pulse_id) if time is None else time)


def test_a_range_cursor_by_pulse_id():
    cursor = RangeCursor(start_pulse_id=5, stop_pulse_id=8, first_stored=record(3))
    assert cursor.opening() == []
    assert cursor.record(record(4)) == []  # before the start
    events = [event for pulse_id in (5, 6, 8) for event in cursor.record(record(pulse_id), b"p")]
    assert events == [Data(5, b"p", 5.0), Data(6, b"p", 6.0), Data(8, b"p", 8.0), End("stop_pulse_id", 8)]
    assert cursor.record(record(9)) == []


def test_a_range_older_than_the_archive_opens_with_a_gap_and_may_end_there():
    cursor = RangeCursor(start_pulse_id=1, stop_pulse_id=50, first_stored=record(10))
    assert cursor.opening() == [Gap(1, 9, "before_archive", None)]
    cursor = RangeCursor(start_pulse_id=1, stop_pulse_id=5, first_stored=record(10))
    assert cursor.opening() == [Gap(1, 5, "before_archive", None), End("stop_pulse_id", None)]
    cursor = RangeCursor(start_time=0.5, first_stored=record(10))
    assert cursor.opening() == [Gap(None, 9, "before_archive", None)]


def test_a_gap_marker_becomes_a_gap_clipped_to_the_range():
    cursor = RangeCursor(start_pulse_id=20, stop_pulse_id=30)
    marker = ArchivedRecord("gap", 10, 1.0, 25, 16, "not_archived")
    assert cursor.record(marker) == [Gap(20, 25, "not_archived", None)]
    assert cursor.record(ArchivedRecord("gap", 26, 1.0, 40, 15, "not_archived")) == \
        [Gap(26, 30, "not_archived", 15)]


def test_a_range_by_time_and_a_moved_stop():
    cursor = RangeCursor(start_time=5.0, stop_time=7.5)
    assert cursor.record(record(4)) == []
    assert [type(e) for e in cursor.record(record(5), b"")] == [Data]
    assert cursor.record(record(8)) == [End("stop_time", 5)]
    cursor = RangeCursor(start_pulse_id=1)
    cursor.record(record(1), b""), cursor.record(record(2), b"")
    assert cursor.set_stop(1, None) == [End("stop_pulse_id", 2)]


def test_the_reach_back_decision_and_the_origin_runs():
    evicted, before, reset = Gap(1, 5, "evicted", 5), Gap(1, 5, "before_buffer", None), Gap(1, None, "source_reset", 3)
    assert should_reach_back(before, True, 0, False) and should_reach_back(evicted, True, 1, True)
    assert not should_reach_back(before, False, 0, False)  # no archive
    assert not should_reach_back(reset, True, 0, False)  # the archive cannot fill a reset
    assert not should_reach_back(before, True, 1, False)  # the last trip brought nothing: the archive lags
    assert not should_reach_back(before, True, 8, True)
    log = OriginLog()
    for origin, pulse_id in (("archive", 1), ("archive", 2), ("ring", 3), ("ring", 5), ("archive", 6)):
        log.add(origin, pulse_id)
    assert json.loads(json.dumps(log.runs())) == [
        {"origin": "archive", "first_pulse_id": 1, "last_pulse_id": 2, "count": 2},
        {"origin": "ring", "first_pulse_id": 3, "last_pulse_id": 5, "count": 2},
        {"origin": "archive", "first_pulse_id": 6, "last_pulse_id": 6, "count": 1}]


def test_the_records_module_is_pure():
    """No broker client, socket, thread or clock when imported in a fresh interpreter."""
    code = ("import sys, sf_bsread_writer.archive.records; "
            "print(sorted(m for m in ('nats', 'zmq', 'socket', 'asyncio', 'threading', 'h5py') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout
