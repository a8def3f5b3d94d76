"""The replay protocol: wire messages, the buffer's session and the client's decisions (pure, fake clock),
and the client's socket against a bare ROUTER."""
from __future__ import annotations

import json
import sys
import time

import pytest
import zmq

from sf_bsread_writer.bsread.spec import DEFAULT_MAX_MESSAGE_BYTES
from sf_bsread_writer.replay.client import ReplayClient, ReplayOversizeError
from sf_bsread_writer.replay.client_state import ReplayClientState, Rerequest
from sf_bsread_writer.replay.messages import (
    MAX_WINDOW,
    Accepted,
    BufferLost,
    CloseSession,
    Credit,
    Data,
    End,
    ErrorReason,
    Gap,
    Heartbeat,
    Refused,
    ReplayProtocolError,
    Request,
    SetStop,
    build_accepted,
    build_close,
    build_credit,
    build_data,
    build_end,
    build_error,
    build_gap,
    build_heartbeat,
    build_request,
    build_set_stop,
    parse_buffer_message,
    parse_writer_message,
)
from sf_bsread_writer.replay.session import ReplaySession
from sf_bsread_writer.ring import Ring


# ---------------------------------------------------------------------------
# wire messages
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("request_", [
    Request(start_pulse_id=0),
    Request(start_pulse_id=20_000_000_000, stop_pulse_id=20_000_000_100, window=1),
    Request(start_time=1.7e9, stop_time=1.7e9 + 10.5, window=MAX_WINDOW),
    Request(start_time=1.7e9, stop_pulse_id=5),
    Request(start_pulse_id=3, max_message_bytes=10_000),
])
def test_request_round_trip(request_):
    assert parse_writer_message(build_request(request_)) == request_


def test_writer_messages_round_trip():
    assert parse_writer_message(build_credit(17)) == Credit(17)
    assert parse_writer_message(build_set_stop(99)) == SetStop(99, None)
    assert parse_writer_message(build_set_stop(None, 5.0)) == SetStop(None, 5.0)
    assert parse_writer_message(build_close()) == CloseSession()


@pytest.mark.parametrize("frames, reason", [
    ([b"not json"], ErrorReason.NOT_JSON),
    ([b"\xff\xfe"], ErrorReason.NOT_JSON),
    ([b"[1, 2]"], ErrorReason.NOT_OBJECT),
    ([b'{"type": "request"}', b"extra"], ErrorReason.BAD_FRAMES),
    ([], ErrorReason.BAD_FRAMES),
    ([b'{"type": "dance"}'], ErrorReason.UNKNOWN_TYPE),
    ([b'{"type": "request"}'], ErrorReason.BAD_FIELD),  # no start
    ([b'{"type": "request", "start_pulse_id": 1, "start_time": 2}'], ErrorReason.BAD_FIELD),
    ([b'{"type": "request", "start_pulse_id": -1}'], ErrorReason.BAD_FIELD),
    ([b'{"type": "request", "start_pulse_id": 1.5}'], ErrorReason.BAD_FIELD),
    ([b'{"type": "request", "start_pulse_id": true}'], ErrorReason.BAD_FIELD),
    ([b'{"type": "request", "start_pulse_id": "7"}'], ErrorReason.BAD_FIELD),
    ([b'{"type": "request", "start_pulse_id": 10, "stop_pulse_id": 9}'], ErrorReason.BAD_FIELD),
    ([b'{"type": "request", "start_time": 10, "stop_time": 9}'], ErrorReason.BAD_FIELD),
    ([b'{"type": "request", "start_time": NaN}'], ErrorReason.BAD_FIELD),
    ([b'{"type": "request", "start_pulse_id": 1, "window": 0}'], ErrorReason.BAD_FIELD),
    ([b'{"type": "request", "start_pulse_id": 1, "window": 100000}'], ErrorReason.BAD_FIELD),
    ([b'{"type": "request", "start_pulse_id": 1, "version": 2}'], ErrorReason.UNSUPPORTED_VERSION),
    ([b'{"type": "credit", "received": -3}'], ErrorReason.BAD_FIELD),
    ([b'{"type": "credit"}'], ErrorReason.BAD_FIELD),
    ([b'{"type": "stop", "stop_pulse_id": "soon"}'], ErrorReason.BAD_FIELD),
])
def test_malformed_writer_messages(frames, reason):
    with pytest.raises(ReplayProtocolError) as info:
        parse_writer_message(frames)
    assert info.value.reason == reason
    assert info.value.detail


def test_buffer_messages_round_trip():
    frames = [b'{"htype": "bsr_m-1.1"}', b"header", b"\x00" * 3, b""]
    data = parse_buffer_message(build_data(12345, frames))
    assert data == Data(12345, frames) and data.frames == frames
    gap = Gap(10, 20, "evicted", 11)
    assert parse_buffer_message(build_gap(gap)) == gap
    assert parse_buffer_message(build_gap(Gap(None, None, "source_reset", 0))) == Gap(None, None, "source_reset", 0)
    assert parse_buffer_message(build_end(End("stop_pulse_id", 99))) == End("stop_pulse_id", 99)
    assert parse_buffer_message(build_heartbeat(Heartbeat(1, 2))) == Heartbeat(1, 2)
    assert parse_buffer_message(build_error(ErrorReason.NOT_JSON, "oops")) == Refused("not_json", "oops")
    assert parse_buffer_message(build_accepted(Accepted(64, None, None))) == Accepted(64, None, None)


def test_a_label_says_what_a_session_is_for_and_older_peers_do_without_it():
    """The writer's output file travels in its request (an optional field within version 1) into the buffer's
    status, across a re-request; a buffer or reader that does not know it loses nothing."""
    from sf_bsread_writer.replay.messages import MAX_LABEL_CHARACTERS, make_label
    from sf_bsread_writer.status import SessionStatus

    request = parse_writer_message(build_request(Request(start_pulse_id=1, stop_pulse_id=3, label="/data/run 7.h5")))
    assert request.label == "/data/run 7.h5"
    assert parse_writer_message([b'{"type": "request", "version": 1, "start_pulse_id": 1}']).label is None
    for bad in (b'""', b'5', b'"a\\nb"', json.dumps("x" * (MAX_LABEL_CHARACTERS + 1)).encode()):
        with pytest.raises(ReplayProtocolError) as refused:
            parse_writer_message([b'{"type": "request", "start_pulse_id": 1, "label": ' + bad + b'}'])
        assert refused.value.reason == "bad_field"
    for text in ("plain.h5", "new\nline.h5", "", "/" + "d" * 5000 + "/end.h5"):  # any path becomes a valid label
        label = make_label(text)
        assert parse_writer_message(build_request(Request(start_pulse_id=1, label=label))).label == label
    assert make_label("/" + "d" * 5000 + "/end.h5").endswith("/end.h5")

    ring = _ring(range(1, 6))
    session = ReplaySession("s", request, ring, 0.0)
    session.poll(ring, 0.0)
    status = session.status()
    assert (status.label, status.last_pulse_id, status.last_time) == ("/data/run 7.h5", 3, ring.timestamp(2))
    older = {key: value for key, value in status.to_json().items() if key not in ("label", "last_time")}
    assert SessionStatus.from_json(older).label is None  # a newer reader of an older buffer's status

    state = ReplayClientState(Request(start_pulse_id=1, label="/data/run 7.h5"))
    state.start(0.0)
    assert parse_writer_message(state.restart(1.0)).label == "/data/run 7.h5"


def test_message_times_are_sent_only_to_a_writer_that_asks():
    """An extension within version 1: old writers get ``data <pulse_id>``; new ones ask for the time."""
    request = parse_writer_message(build_request(Request(start_pulse_id=1, message_times=True)))
    assert request.message_times is True
    assert parse_writer_message([b'{"type": "request", "version": 1, "start_pulse_id": 1}']).message_times is False
    with pytest.raises(ReplayProtocolError):
        parse_writer_message([b'{"type": "request", "start_pulse_id": 1, "message_times": "yes"}'])
    ring = Ring(10, 1 << 20)
    ring.append(1, 1_700_000_000.5, [b"main", b"header"])
    for asks, time in ((True, 1_700_000_000.5), (False, None)):
        session = ReplaySession("s", Request(start_pulse_id=1, message_times=asks), ring, 0.0)
        events = [event for event in session.poll(ring, 0.0) if isinstance(event, Data)]
        assert [(event.pulse_id, event.time) for event in events] == [(1, time)]


def test_data_carries_the_time_the_buffer_indexed_it_by_exactly():
    frames = [b"main", b"header"]
    for time in (1_700_000_000.123456789, 0.1 + 0.2, 5e-324, 1e300):
        data = parse_buffer_message(build_data(7, frames, time))
        assert data.time == time and data.pulse_id == 7 and data.frames == frames  # repr: the same float back
    assert parse_buffer_message(build_data(7, frames)).time is None  # no time known
    assert parse_buffer_message(build_data(7, frames, float("nan"))).time is None  # NaN says nothing: not sent
    assert parse_buffer_message([b"data 7", *frames]) == Data(7, frames)


@pytest.mark.parametrize("frames", [[], [b"data x"], [b"gap"], [b"gap", b"{"], [b"what", b"{}"],
                                    [b"gap", b'{"count": "many"}'], [b"data 5 abc"], [b"data 5 1.0 2.0"],
                                    [b"data 5 nan"], [b"data 5 inf"], [b"data 5  1.0"]])
def test_malformed_buffer_messages(frames):
    with pytest.raises(ReplayProtocolError):
        parse_buffer_message(frames)


# ---------------------------------------------------------------------------
# the session, against a real Ring (frames are opaque to both)
# ---------------------------------------------------------------------------
def _frames(pulse_id: int) -> list[bytes]:
    return [json.dumps({"pulse_id": pulse_id}).encode(), b"header", b"value%d" % pulse_id, b"\x00" * 16]


def _ring(pulse_ids, max_messages=1000, t0=1000.0) -> Ring:
    ring = Ring(max_messages, 10**9)
    for pulse_id in pulse_ids:
        ring.append(pulse_id, t0 + pulse_id * 0.01, _frames(pulse_id))
    return ring


def _data(events) -> list[int]:
    return [event.pulse_id for event in events if isinstance(event, Data)]


def test_session_backlog_respects_window_and_credit():
    ring = _ring(range(100, 120))
    session = ReplaySession("s", Request(start_pulse_id=105, window=4), ring, now=0.0)
    first = session.poll(ring, 0.0)
    assert _data(first) == [105, 106, 107, 108]
    assert [bytes(f) for f in first[0].frames] == _frames(105)  # the original frames, unchanged
    assert session.poll(ring, 0.0) == []  # no credit: nothing
    session.on_message(Credit(3), 0.0)
    assert _data(session.poll(ring, 0.0)) == [109, 110, 111]
    session.on_message(Credit(1000), 0.0)  # more than sent: capped, cannot inflate the window
    assert session.in_flight == 0
    assert _data(session.poll(ring, 0.0)) == [112, 113, 114, 115]


def test_session_stop_is_inclusive_and_ends_at_once():
    ring = _ring(range(100, 110))
    session = ReplaySession("s", Request(start_pulse_id=102, stop_pulse_id=104, window=100), ring, 0.0)
    events = session.poll(ring, 0.0)
    assert _data(events) == [102, 103, 104]
    assert events[-1] == End("stop_pulse_id", 104)
    assert session.ended and session.poll(ring, 0.0) == []


def test_session_ends_on_stop_pulse_not_held():
    """A slow source skips the stop pulse: the first later pulse ends the session."""
    ring = _ring(range(100, 200, 10))
    session = ReplaySession("s", Request(start_pulse_id=100, stop_pulse_id=125, window=100), ring, 0.0)
    events = session.poll(ring, 0.0)
    assert _data(events) == [100, 110, 120] and events[-1] == End("stop_pulse_id", 120)


def test_session_follows_live_and_stop_update():
    ring = _ring(range(100, 103))
    session = ReplaySession("s", Request(start_pulse_id=101, window=100), ring, 0.0)
    assert _data(session.poll(ring, 0.0)) == [101, 102]
    assert session.poll(ring, 0.1) == []  # caught up, nothing new, heartbeat not due
    for pulse_id in range(103, 106):
        ring.append(pulse_id, 0.0, _frames(pulse_id))
    assert _data(session.poll(ring, 0.2)) == [103, 104, 105]
    session.on_message(SetStop(stop_pulse_id=104), 0.3)  # already passed: end at once
    assert session.poll(ring, 0.3) == [End("stop_pulse_id", 105)]


def test_session_start_in_the_future_skips_older_live_messages():
    ring = _ring(range(100, 105))
    session = ReplaySession("s", Request(start_pulse_id=108, stop_pulse_id=109, window=100), ring, 0.0)
    assert session.poll(ring, 0.0) == []
    for pulse_id in range(105, 112):
        ring.append(pulse_id, 0.0, _frames(pulse_id))
    events = session.poll(ring, 0.0)
    assert _data(events) == [108, 109] and isinstance(events[-1], End)


def test_session_before_buffer_gap():
    ring = _ring(range(100, 110))
    session = ReplaySession("s", Request(start_pulse_id=50, stop_pulse_id=101, window=100), ring, 0.0)
    events = session.poll(ring, 0.0)
    assert events[0] == Gap(50, 99, "before_buffer", None)
    assert _data(events) == [100, 101]


def test_session_time_start_and_stop():
    ring = _ring(range(100, 120))  # timestamps 1001.00, 1001.01, ...
    session = ReplaySession("s", Request(start_time=1001.05, stop_time=1001.075, window=100), ring, 0.0)
    events = session.poll(ring, 0.0)
    assert _data(events) == [105, 106, 107]
    assert events[-1] == End("stop_time", 107)
    before = ReplaySession("s", Request(start_time=900.0, window=2), ring, 0.0)
    assert before.poll(ring, 0.0)[0] == Gap(None, 99, "before_buffer", None)


def test_session_eviction_gap_counts_exactly():
    ring = _ring(range(100, 105), max_messages=10)
    session = ReplaySession("s", Request(start_pulse_id=100, window=2), ring, 0.0)
    assert _data(session.poll(ring, 0.0)) == [100, 101]
    for pulse_id in range(105, 130):  # the ring (10) overtakes the stalled cursor (at 102)
        ring.append(pulse_id, 0.0, _frames(pulse_id))
    assert session.poll(ring, 0.0) == []  # no credit yet: the gap waits, coalesced
    session.on_message(Credit(2), 0.0)
    events = session.poll(ring, 0.0)
    assert events[0] == Gap(102, 119, "evicted", 18)
    assert _data(events) == [120, 121]
    assert session.gaps == 1 and session.lost == 18


def test_session_source_reset_with_and_without_loss():
    ring = _ring(range(100, 110))
    caught_up = ReplaySession("a", Request(start_pulse_id=100, window=100), ring, 0.0)
    behind = ReplaySession("b", Request(start_pulse_id=100, window=4), ring, 0.0)
    assert len(_data(caught_up.poll(ring, 0.0))) == 10
    assert _data(behind.poll(ring, 0.0)) == [100, 101, 102, 103]
    for pulse_id in range(5, 8):  # source restarted: the ring drops everything >= 5
        ring.append(pulse_id, 0.0, _frames(pulse_id))
    events = caught_up.poll(ring, 0.0)
    assert events[0] == Gap(None, None, "source_reset", 0)  # nothing lost, but say so
    assert _data(events) == [5, 6, 7]
    behind.on_message(Credit(4), 0.0)
    events = behind.poll(ring, 0.0)
    assert events[0] == Gap(104, None, "source_reset", 6)  # 104..109 never sent
    assert _data(events) == [5, 6, 7]


def test_session_heartbeat_when_idle_and_expiry():
    ring = _ring(range(100, 101))
    session = ReplaySession("s", Request(start_pulse_id=200, window=8), ring, 0.0, heartbeat_interval=1.0)
    assert session.poll(ring, 0.5) == []
    assert session.poll(ring, 1.1) == [Heartbeat(100, 100)]
    assert session.poll(ring, 1.5) == []
    assert not session.expired(5.0, timeout=10.0)
    session.on_message(Credit(0), 9.0)
    assert not session.expired(15.0, timeout=10.0) and session.expired(19.5, timeout=10.0)


def test_session_bytes_in_flight_are_bounded_as_well_as_messages():
    """A writer that never grants credit pins at most max_in_flight_bytes (at least one message), then nothing."""
    ring = Ring(1000, 10**9)
    for pulse_id in range(100):
        ring.append(pulse_id, 0.0, [b"m%d" % pulse_id, b"h", b"v" * 10_000, b"t" * 16])
    size = ring.nbytes(ring.first_seq)
    session = ReplaySession("s", Request(start_pulse_id=0, window=MAX_WINDOW), ring, 0.0,
                            max_in_flight_bytes=5 * size)
    assert _data(session.poll(ring, 0.0, budget=100)) == [0, 1, 2, 3, 4]
    assert session.poll(ring, 0.0, budget=100) == [] and not session.has_work(ring)
    assert session.in_flight_bytes == 5 * size
    session.on_message(Credit(2), 0.1)  # two consumed: room for two more
    assert _data(session.poll(ring, 0.2, budget=100)) == [5, 6]
    assert session.status().in_flight_bytes == 5 * size
    tiny = ReplaySession("t", Request(start_pulse_id=0, window=8), ring, 0.0, max_in_flight_bytes=1)
    assert _data(tiny.poll(ring, 0.0)) == [0]  # one message always fits, however large


def test_a_message_larger_than_the_writer_takes_is_sent_as_a_gap_naming_its_pulse():
    """A writer says how large a message it takes (``max_message_bytes``, an extension of version 1): a larger one
    is never sent (it would be refused at the writer's socket, or rejected by its parser, at the cost of its
    bytes); a gap names its pulse (``oversize``, counted lost), and the messages after it follow as before."""
    ring = Ring(1000, 10**9)
    for pulse_id in range(10, 15):
        ring.append(pulse_id, 0.0, [b"m%d" % pulse_id, b"h", b"v" * (5_000 if pulse_id == 12 else 10), b"t" * 16])
    session = ReplaySession("s", Request(start_pulse_id=10, window=8, max_message_bytes=1_000), ring, 0.0)
    events = session.poll(ring, 0.0)
    assert _data(events) == [10, 11, 13, 14]
    assert [event for event in events if isinstance(event, Gap)] == [Gap(12, 12, "oversize", 1)]
    assert events.index(Gap(12, 12, "oversize", 1)) == 2  # in its place, between 11 and 13
    assert session.status().lost == 1 and session.status().gaps == 1 and session.in_flight == 4
    older = ReplaySession("o", Request(start_pulse_id=10, window=8), ring, 0.0)  # a writer that says nothing
    assert _data(older.poll(ring, 0.0)) == [10, 11, 12, 13, 14]
    stop = ReplaySession("p", Request(start_pulse_id=10, stop_pulse_id=12, max_message_bytes=1_000), ring, 0.0)
    assert stop.poll(ring, 0.0)[-2:] == [Gap(12, 12, "oversize", 1), End("stop_pulse_id", 12)]


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "10"])
def test_a_request_with_a_bad_message_size_limit_is_refused(bad):
    body = json.dumps({"type": "request", "version": 1, "start_pulse_id": 1, "max_message_bytes": bad}).encode()
    with pytest.raises(ReplayProtocolError) as error:
        parse_writer_message([body])
    assert error.value.reason == ErrorReason.BAD_FIELD


def test_session_budget_bounds_work_per_poll():
    ring = _ring(range(0, 500))
    session = ReplaySession("s", Request(start_pulse_id=0, window=MAX_WINDOW), ring, 0.0)
    assert len(_data(session.poll(ring, 0.0, budget=7))) == 7
    assert session.has_work(ring)


# ---------------------------------------------------------------------------
# the client's decisions on a fake clock (pure)
# ---------------------------------------------------------------------------
def _message(frames: list[bytes] | None):
    return None if frames is None else parse_writer_message(frames)


def test_client_state_credits_per_quarter_window_and_as_heartbeat():
    state = ReplayClientState(Request(start_pulse_id=7, window=8), heartbeat_interval=1.0, peer_timeout=5.0)
    assert _message(state.start(100.0)) == Request(start_pulse_id=7, window=8)
    assert state.credit(100.5) is None  # nothing consumed, no heartbeat due yet
    assert _message(state.credit(101.0)) == Credit(0)  # the heartbeat: a credit of what was consumed
    assert state.credit(101.5) is None
    assert state.received(build_accepted(Accepted(8, 1, 9)), 101.6) is None
    assert state.accepted == Accepted(8, 1, 9)
    assert state.received(build_data(7, _frames(7)), 101.7) == Data(7, _frames(7))
    assert state.credit(101.7) is None  # window 8: a credit every 2 messages
    assert state.received(build_data(8, _frames(8)), 101.8).pulse_id == 8
    assert _message(state.credit(101.8)) == Credit(2)
    assert state.last_pulse_id == 8
    assert state.wait_seconds(101.8, deadline=110.0) == 0.5  # half a heartbeat interval at most
    assert state.wait_seconds(101.8, deadline=101.9) == pytest.approx(0.1)
    assert state.wait_seconds(101.8, deadline=100.0) == 0.0


def test_client_state_gives_up_a_silent_buffer_and_asks_for_the_rest():
    state = ReplayClientState(Request(start_pulse_id=7, stop_pulse_id=20, window=4), heartbeat_interval=1.0,
                              peer_timeout=5.0)
    state.start(0.0)
    state.received(build_data(7, _frames(7)), 1.0)
    state.received(build_data(8, _frames(8)), 1.0)
    assert state.received(build_heartbeat(Heartbeat(1, 9)), 2.0) is None  # alive, nothing to tell
    assert state.silence(7.0) is None  # heard at 2.0: 5 s are not more than the timeout
    assert state.silence(7.5) == BufferLost(5.5)
    # the rest of the range, from the pulse after the last one received, on a new socket
    assert _message(state.restart(7.5)) == Request(start_pulse_id=9, stop_pulse_id=20, window=4)
    assert state.restarts == 1
    assert state.silence(12.0) is None  # the new socket has its own clock
    assert _message(state.credit(8.5)) == Credit(0)  # and its own count


def test_client_state_re_requests_a_forgotten_session_from_its_start():
    state = ReplayClientState(Request(start_time=1.7e9, stop_time=1.7e9 + 5, window=4))
    state.start(0.0)
    assert state.received(build_error(ErrorReason.UNKNOWN_SESSION, "restarted"), 0.5) == Rerequest()
    assert _message(state.restart(0.5)) == Request(start_time=1.7e9, stop_time=1.7e9 + 5, window=4)
    assert state.received(build_error(ErrorReason.BAD_FIELD, "no"), 0.6) == Refused("bad_field", "no")


def test_client_state_moves_the_stop_and_stays_quiet_after_the_end():
    state = ReplayClientState(Request(start_pulse_id=7, window=4))
    state.start(0.0)
    assert _message(state.set_stop(9, None)) == SetStop(9, None)
    assert _message(state.restart(0.1)) == Request(start_pulse_id=7, stop_pulse_id=9, window=4)
    assert state.received(build_gap(Gap(7, 8, "evicted", 2)), 0.2) == Gap(7, 8, "evicted", 2)
    assert state.received(build_end(End("stop_pulse_id", 9)), 0.3) == End("stop_pulse_id", 9)
    assert state.received(build_data(10, _frames(10)), 0.4) is None  # nothing after End counts
    assert state.credit(100.0) is None and state.silence(100.0) is None and state.close() is None


def test_client_state_drops_a_malformed_message_but_hears_the_buffer():
    state = ReplayClientState(Request(start_pulse_id=7, window=4), peer_timeout=5.0)
    state.start(0.0)
    assert state.received([b"dance"], 4.0) is None
    assert state.silence(8.0) is None and state.silence(9.5) is not None
    assert _message(state.close()) == CloseSession()


# ---------------------------------------------------------------------------
# the client against bare sockets
# ---------------------------------------------------------------------------
@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def test_client_grants_credit_over_a_socket(context):
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:0")
    client = ReplayClient(router.getsockopt_string(zmq.LAST_ENDPOINT), start_pulse_id=7, window=4,
                          context=context)
    try:
        client.start()
        assert router.poll(10_000)
        identity, body = router.recv_multipart()
        assert parse_writer_message([body]) == Request(start_pulse_id=7, window=4, message_times=True,
                                                       max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES)
        router.send_multipart([identity, *build_accepted(Accepted(4, None, None))])
        for pulse_id in (7, 8):
            router.send_multipart([identity, *build_data(pulse_id, _frames(pulse_id))])
        events = [client.receive(10), client.receive(10)]
        assert [e.pulse_id for e in events] == [7, 8]
        assert [bytes(f) for f in events[0].frames] == _frames(7)
        # window 4 -> a credit every 1 message; the cumulative count reaches 2
        credits = []
        while not credits or credits[-1] < 2:
            assert router.poll(10_000)
            credits.append(parse_writer_message(router.recv_multipart()[1:]).received)
        assert client.accepted == Accepted(4, None, None) and client.last_pulse_id == 8
    finally:
        client.close()
        router.close()


def test_client_re_requests_on_a_new_socket(context):
    """The buffer forgot the session: the rest of the range is asked for from a new socket (identity)."""
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:0")
    client = ReplayClient(router.getsockopt_string(zmq.LAST_ENDPOINT), start_pulse_id=7, window=4,
                          context=context)
    try:
        client.start()
        assert router.poll(10_000)
        first, _ = router.recv_multipart()
        router.send_multipart([first, *build_data(7, _frames(7))])
        assert client.receive(10).pulse_id == 7
        router.send_multipart([first, *build_error(ErrorReason.UNKNOWN_SESSION, "who are you?")])
        deadline = time.monotonic() + 10
        while client.restarts == 0:  # handled inside receive: nothing for the caller
            assert client.receive(0.05) is None and time.monotonic() < deadline
        requests = []
        while not requests:
            assert router.poll(10_000)
            identity, body = router.recv_multipart()
            if isinstance(message := parse_writer_message([body]), Request):
                requests.append((identity, message))
        assert requests == [(requests[0][0], Request(start_pulse_id=8, window=4, message_times=True,
                                                     max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES))]
        assert requests[0][0] != first and client.restarts == 1
    finally:
        client.close()
        router.close()


def test_a_part_over_the_clients_bound_is_refused_counted_and_reported(context):
    """The writer's replay socket trusted its buffer: a part of any size arrived whole in the writer's memory.
    Now a part over twice ``max_message_bytes`` is refused at its header (ZMQ_MAXMSGSIZE); libzmq gives the
    connection up for good, and the client asks for the rest of the range on a new socket (counted in
    ``reconnects``), reporting a loss whose pulse ids it cannot know (the writer's outcome: partial). A peer that
    sends it again before anything else arrives fails the session with a clear error, never a loop."""
    limit = 10_000
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:0")
    client = ReplayClient(router.getsockopt_string(zmq.LAST_ENDPOINT), start_pulse_id=7, window=4,
                          context=context, max_message_bytes=limit)
    try:
        client.start()
        assert router.poll(10_000)
        first, body = router.recv_multipart()
        assert parse_writer_message([body]).max_message_bytes == limit
        router.send_multipart([first, *build_data(7, _frames(7))])
        router.send_multipart([first, *build_data(8, _frames(8)[:2] + [b"\0" * (3 * limit)])])
        assert client.receive(10).pulse_id == 7
        deadline = time.monotonic() + 10
        event = None
        while event is None and time.monotonic() < deadline:
            event = client.receive(0.1)
        assert event == Gap(None, None, "oversize", None) and client.reconnects == 1
        requests = []
        while not requests:
            assert router.poll(10_000)
            identity, body = router.recv_multipart()
            if identity != first and isinstance(message := parse_writer_message([body]), Request):
                requests.append((identity, message))
        assert requests[0][1].start_pulse_id == 8  # the rest of the range, after the last pulse received
        router.send_multipart([requests[0][0], *build_data(8, _frames(8)[:2] + [b"\0" * (3 * limit)])])
        with pytest.raises(ReplayOversizeError, match="twice"):
            while time.monotonic() < deadline:
                client.receive(0.1)
        assert client.reconnects == 1 and client.state.parts_refused == 2
    finally:
        client.close()
        router.close()


class SteppingClock:
    """Fake time that moves on by ``step`` at every reading: the client's waits are short, its clock long."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_client_heartbeats_and_gives_up_a_silent_buffer_on_its_clock(context):
    """The socket shell acts on the state's decisions: a credit while idle, BufferLost, a new socket."""
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:0")
    # heartbeat 0.02 (fake s) -> real polls of 10 ms; every clock reading is 0.05 fake s later
    client = ReplayClient(router.getsockopt_string(zmq.LAST_ENDPOINT), start_pulse_id=7, window=4,
                          heartbeat_interval=0.02, peer_timeout=5.0, context=context, clock=SteppingClock(0.05))
    try:
        client.start()
        assert router.poll(10_000)
        first, body = router.recv_multipart()
        assert parse_writer_message([body]) == Request(start_pulse_id=7, window=4, message_times=True,
                                                       max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES)
        event = client.receive(timeout=60.0)  # fake seconds: the buffer stays silent
        assert isinstance(event, BufferLost) and event.seconds_silent > 5.0
        messages = []
        while not any(isinstance(m, Request) for _, m in messages) or router.poll(100):
            assert router.poll(10_000)
            identity, body = router.recv_multipart()
            messages.append((identity, parse_writer_message([body])))
        credits = [m for i, m in messages if i == first and isinstance(m, Credit)]
        assert credits and all(credit == Credit(0) for credit in credits)  # heartbeats while it waited
        requests = [(i, m) for i, m in messages if isinstance(m, Request)]
        assert len(requests) == 1 and requests[0][0] != first  # the range again, from a new socket
        assert requests[0][1] == Request(start_pulse_id=7, window=4, message_times=True,
                                         max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES) and client.restarts == 1
    finally:
        client.close()
        router.close()


def test_client_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ReplayClient("tcp://127.0.0.1:1", start_pulse_id=1, start_time=2.0)
    with pytest.raises(ValueError):
        ReplayClient("tcp://127.0.0.1:1")
    with pytest.raises(ValueError):
        ReplayClient("tcp://127.0.0.1:1", start_pulse_id=1, window=0)


def test_a_session_whose_heartbeat_waits_unread_in_the_socket_is_not_expired():
    """The buffer decides a writer is silent only after reading what it sent: a buffer that could not
    run for a while (a loaded machine; the in-process test writer holding the interpreter in one long
    HDF5 call) finds the heartbeats waiting in its socket. CI saw a busy writer's session expire
    ("writer silent for 0.7 s") while its heartbeats were queued (test_busy_writer)."""
    from sf_bsread_writer.replay.endpoint import ReplayEndpoint

    from .helpers import FakeClock, wait_for

    clock = FakeClock()
    context = zmq.Context.instance()
    ring = Ring(100, 10**8)
    for pulse_id in range(1, 11):
        ring.append(pulse_id, 1000.0 + pulse_id, [b'{"pulse_id": %d}' % pulse_id, b"header", b"v%d" % pulse_id])
    endpoint = ReplayEndpoint(context, "tcp://127.0.0.1:0", ring, 0.1, 0.5, clock=clock)
    client = ReplayClient(endpoint.address, start_pulse_id=1, stop_pulse_id=10, window=2, context=context,
                          heartbeat_interval=0.1, clock=clock)
    try:
        client.start()
        wait_for(lambda: endpoint.serve(clock() + 10) is not None and endpoint.status().active_sessions == 1, 20,
                 interval=0.01, message="the session")
        clock.advance(0.45)  # heard at the start; the writer stays busy ...
        client.keep_alive()  # ... and sends a heartbeat (due: 0.1 s), which the buffer has not read yet
        wait_for(lambda: endpoint.socket.poll(10), 20, message="the heartbeat waiting in the socket")
        clock.advance(0.2)  # 0.65 s after the last message the buffer READ
        endpoint.expire(clock())
        assert endpoint.status().active_sessions == 1, endpoint.status()
        assert endpoint.status().expired == 0
    finally:
        client.close()
        endpoint.close()


# A fresh process receives one 2 MB image through a ReplayClient from a bare ROUTER, then asks glibc where a
# 24 MiB block comes from (mallinfo2: hblkhd counts mmapped bytes) and whether the heap keeps it once freed
# (fordblks: bytes free inside the heaps). Its own process: allocator settings are per process, and this one's are not fresh.
_ALLOCATOR_PROBE = r"""
import ctypes, json, sys, zmq
from sf_bsread_writer.replay.client import ReplayClient
from sf_bsread_writer.replay.messages import Accepted, Data, build_accepted, build_data

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
context = zmq.Context()
router = context.socket(zmq.ROUTER)
router.setsockopt(zmq.LINGER, 0)
router.bind("tcp://127.0.0.1:0")
client = ReplayClient(router.getsockopt_string(zmq.LAST_ENDPOINT), start_pulse_id=7, context=context,
                      **json.loads(sys.argv[1]))
client.start()
assert router.poll(20_000), "no request"
identity, _ = router.recv_multipart()
router.send_multipart([identity, *build_accepted(Accepted(64, None, None))])
image = bytes(range(256)) * (2 * 4096)
router.send_multipart([identity, *build_data(7, [b'{"pulse_id": 7}', b"header", image])])
event = client.receive(20.0)
assert isinstance(event, Data) and bytes(event.frames[2]) == image, event
del event
block_bytes = 24 * 2**20
before = libc.mallinfo2()
block = libc.malloc(block_bytes)
mapped = libc.mallinfo2().hblkhd - before.hblkhd >= block_bytes
libc.free(block)
kept = libc.mallinfo2().fordblks >= block_bytes  # free but still the heap's: not trimmed
client.close()
router.close()
context.term()
print("ALLOCATOR " + json.dumps({"mapped": mapped, "kept": kept}), flush=True)
"""


@pytest.mark.parametrize("options, expected", [
    ({}, {"mapped": False, "kept": True}),
    ({"keep_receive_memory": False}, {"mapped": True, "kept": False}),
])
def test_a_replay_client_keeps_its_process_receive_memory(options, expected):
    """Issue 24: a fresh process receiving camera images through the replay paid 15-110 page faults per
    1 MB image, because glibc handed the freed images of libzmq's I/O thread back to the kernel
    (madvise(MADV_DONTNEED) trims of its arena, strace) and every next image faulted fresh pages in.
    A ReplayClient sets its process's allocator as the buffer's and the writer's are
    (``process.tune_allocator``: large blocks from the heap, freed ones kept), unless told not to (the web
    service, which gives a large range's memory back)."""
    import ctypes

    from .helpers import Child

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc >= 2.33: no mallinfo2 to ask")
    with Child([sys.executable, "-c", _ALLOCATOR_PROBE, json.dumps(options)]) as child:
        line = child.wait_for_line("ALLOCATOR ", timeout=60)
        assert json.loads(line.split(" ", 1)[1]) == expected
        assert child.wait(timeout=20) == 0
