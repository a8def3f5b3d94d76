"""The writer's pure core: request validation, the state machine, the pulse-range logic. No sockets, no threads."""
from __future__ import annotations

import os

import pytest

from sf_bsread_writer.writer.acquisition import (
    BadRequest,
    EndRun,
    MoveStop,
    Outcome,
    StartRun,
    State,
    WriterControl,
    WrongState,
    parse_pulse_id,
)
from sf_bsread_writer.writer.outputs import resolve_output_file
from sf_bsread_writer.writer.pulse_range import PulseRange, Verdict

PARAMETERS = {"general/created": "2024-01-01T00:00:00", "general/user": "e12345",
              "general/process": "daq", "general/instrument": "alvra"}


# -- input validation ------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("0", 0), ("123", 123), ("20000000000", 20_000_000_000),
                                         (str(2**63 - 1), 2**63 - 1), (42, 42)])
def test_parse_pulse_id_accepts_non_negative_int64(text, value):
    assert parse_pulse_id(text) == value


@pytest.mark.parametrize("text, words", [
    ("-1", "negative"), ("abc", "non-negative integer"), ("1.5", "non-negative integer"), ("", "non-negative"),
    (" 5", "non-negative integer"), ("0x10", "non-negative integer"), (str(2**63), "int64"), (-3, "negative"),
    (True, "integer"), ("１２", "non-negative integer"),  # full-width digits are not decimal ASCII
])
def test_parse_pulse_id_rejects_with_a_reason(text, words):
    with pytest.raises(BadRequest) as caught:
        parse_pulse_id(text, "start_pulse_id")
    assert words in caught.value.message and "start_pulse_id" in caught.value.message
    assert caught.value.http_status == 400


def test_output_file_inside_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    assert resolve_output_file("run1/file.h5", str(root)) == str(root / "run1" / "file.h5")
    assert resolve_output_file(str(root / "a.h5"), str(root)) == str(root / "a.h5")
    # ".." that stays inside is fine: the real path counts.
    assert resolve_output_file("run1/../b.h5", str(root)) == str(root / "b.h5")
    # /dev/null writes nothing, so it is always allowed.
    assert resolve_output_file("/dev/null", str(root)) == "/dev/null"


@pytest.mark.parametrize("path", ["../escape.h5", "a/../../escape.h5", "/etc/passwd.h5", "/tmp/x.h5", "."])
def test_output_file_outside_the_root_is_refused(tmp_path, path):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(BadRequest) as caught:
        resolve_output_file(path, str(root))
    assert "outside the output root" in caught.value.message


def test_symlink_escaping_the_root_is_refused(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "link").symlink_to(elsewhere)
    (root / "file_link.h5").symlink_to(elsewhere / "target.h5")
    for path in ("link/x.h5", str(root / "link" / "x.h5"), "file_link.h5"):
        with pytest.raises(BadRequest, match="outside the output root"):
            resolve_output_file(path, str(root))
    # A symlink that stays inside the root is fine.
    (root / "inside").mkdir()
    (root / "inner_link").symlink_to(root / "inside")
    assert resolve_output_file("inner_link/y.h5", str(root)) == str(root / "inside" / "y.h5")


def test_output_file_never_overwrites_and_must_be_a_path(tmp_path):
    existing = tmp_path / "old.h5"
    existing.write_bytes(b"earlier acquisition")
    with pytest.raises(BadRequest, match="already exists"):
        resolve_output_file(str(existing), None)
    with pytest.raises(BadRequest, match="is a directory"):
        resolve_output_file(str(tmp_path), None)
    for bad in (None, "", "  ", 5, ["a"], "a\x00b"):
        with pytest.raises(BadRequest, match="output_file"):
            resolve_output_file(bad, None)
    # Relative without a root: relative to the given base (the working directory by default).
    assert resolve_output_file("x.h5", None, str(tmp_path)) == str(tmp_path / "x.h5")
    assert resolve_output_file("x.h5", None) == os.path.abspath("x.h5")


# -- the state machine -------------------------------------------------------------
def test_happy_path_by_pulse_id():
    control = WriterControl("out.h5")
    assert control.state is State.WAITING
    assert control.set_parameters({**PARAMETERS, "extra/key": [1, 2]})["extra/key"] == [1, 2]
    assert control.stop_at_pulse(200) is None  # before the start: remembered, nothing to send yet
    start = control.start_at_pulse(100)
    assert start == StartRun("out.h5", 100, None, 200, None, {**PARAMETERS, "extra/key": [1, 2]})
    assert control.state is State.WRITING
    assert control.stop_at_pulse(150) == MoveStop(150, None)  # moved while writing
    control.finishing("stop_reached")
    assert control.state is State.FINISHING
    control.finished()
    assert control.state is State.FINISHED and control.error is None


def test_start_now_and_stop_now_use_the_given_clock():
    control = WriterControl("out.h5")
    start = control.start_now(1000.5, output_file="other.h5")
    assert (start.start_pulse_id, start.start_time, start.output_file) == (None, 1000.5, "other.h5")
    assert control.stop_now(1010.25) == MoveStop(None, 1010.25, now=True)
    # A second stop_now never moves the stop later.
    assert control.stop_now(1020.0) == MoveStop(None, 1010.25, now=True)
    assert control.stop_at_pulse(5) == MoveStop(5, 1010.25)  # whichever comes first


def test_output_file_is_checked_at_start():
    seen = []

    def check(path, requested):
        seen.append((path, requested))
        if "bad" in path:
            raise BadRequest("output_file outside the output root")
        return "/abs/" + path

    control = WriterControl("default.h5", check)
    with pytest.raises(BadRequest):
        control.start_now(1.0, "bad.h5")
    assert control.state is State.WAITING  # a refused start changes nothing
    assert control.start_at_pulse(7).output_file == "/abs/default.h5"
    assert seen == [("bad.h5", True), ("default.h5", False)]


@pytest.mark.parametrize("body, words", [
    ([1, 2], "JSON object"), ("text", "JSON object"), (None, "JSON object"),
    ({}, "Missing mandatory parameters: general/created, general/user, general/process, general/instrument"),
    ({**PARAMETERS, "general/user": ""}, "Missing mandatory parameters: general/user"),
    ({k: v for k, v in PARAMETERS.items() if k != "general/process"}, "Missing mandatory parameters: general/process"),
    ({**PARAMETERS, "general/user": {"name": "x"}}, "general/user must be a string or a number"),
    ({**PARAMETERS, "general/created": True}, "general/created must be a string or a number"),
])
def test_bad_parameters_are_400(body, words):
    control = WriterControl("out.h5")
    with pytest.raises(BadRequest) as caught:
        control.set_parameters(body)
    assert words in caught.value.message
    assert control.parameters == {}


def test_wrong_state_is_409():
    control = WriterControl("out.h5")
    with pytest.raises(WrongState, match="has not started"):
        control.stop_now(1.0)  # stop before start
    control.set_parameters(PARAMETERS)
    control.start_at_pulse(10)
    with pytest.raises(WrongState, match="already writing .from start_pulse_id 10"):
        control.start_at_pulse(11)
    with pytest.raises(WrongState, match="already writing"):
        control.start_now(2.0)
    with pytest.raises(WrongState, match="parameters can only be set before the start"):
        control.set_parameters(PARAMETERS)
    assert control.stop() == EndRun("stopped")
    assert control.state is State.FINISHING
    for request in (lambda: control.stop_at_pulse(20), lambda: control.stop_now(3.0),
                    lambda: control.start_at_pulse(30), lambda: control.set_parameters(PARAMETERS)):
        with pytest.raises(WrongState) as caught:
            request()
        assert caught.value.http_status == 409 and "finishing" in caught.value.message
    assert control.stop() is None  # idempotent
    control.finished()
    with pytest.raises(WrongState, match="finished"):
        control.start_now(4.0)


def test_inconsistent_range_is_400():
    control = WriterControl("out.h5")
    control.stop_at_pulse(100)
    with pytest.raises(BadRequest, match="start_pulse_id 101 is after the stop_pulse_id 100"):
        control.start_at_pulse(101)
    assert control.start_at_pulse(100).stop_pulse_id == 100  # a one-pulse range
    with pytest.raises(BadRequest, match="stop_pulse_id 99 is before the start_pulse_id 100"):
        control.stop_at_pulse(99)


def test_stop_before_start_finishes_without_a_file():
    control = WriterControl("out.h5")
    assert control.stop("killed") is None
    assert control.state is State.FINISHED and control.end_reason == "killed before start"


def test_failed_start_returns_to_waiting_unless_stopped_meanwhile():
    control = WriterControl("out.h5")
    control.start_at_pulse(5)
    control.start_failed("cannot open")
    assert control.state is State.WAITING and control.start_pulse_id is None and control.error == "cannot open"
    control.start_at_pulse(6)  # the DAQ may try again
    control.stop()
    control.start_failed("cannot open")
    assert control.state is State.FINISHED


def test_failure_while_writing_is_error():
    control = WriterControl("out.h5")
    control.start_now(1.0)
    control.finishing("writer_error")
    control.finished("OSError: disk full")
    assert control.state is State.ERROR and control.error == "OSError: disk full"


# -- persistent mode (the original's: a start that names its output_file) ----------
def test_a_persistent_run_that_ends_by_itself_waits_for_the_next_start():
    control = WriterControl("default.h5")
    control.set_parameters(PARAMETERS)
    control.stop_at_pulse(20)  # a stop set before the start belongs to that start
    start = control.start_at_pulse(10, output_file="run1.h5")
    assert start.persistent and start.stop_pulse_id == 20
    control.finishing("stop_reached")
    control.finished(outcome=Outcome.COMPLETE)
    assert control.state is State.WAITING and control.runs_finished == 1
    # Nothing of the last range carries over; the parameters do.
    assert (control.start_pulse_id, control.stop_pulse_id, control.output_file) == (None, None, "default.h5")
    assert control.outcome is Outcome.COMPLETE and control.parameters == PARAMETERS
    second = control.start_now(5.0, output_file="run2.h5")
    assert second.stop_pulse_id is None and second.persistent and control.outcome is None
    control.finishing("source_silent")
    control.finished(outcome=Outcome.PARTIAL)
    assert control.state is State.WAITING and control.exit_outcome is Outcome.PARTIAL
    assert control.stop() is None  # /stop while waiting ends the process
    assert control.state is State.FINISHED and control.end_reason == "source_silent"
    assert control.exit_outcome is Outcome.PARTIAL and control.runs_finished == 2


def test_a_persistent_run_ended_by_stop_ends_the_process():
    control = WriterControl("default.h5")
    control.start_at_pulse(10, output_file="run1.h5")
    assert control.stop("killed") == EndRun("killed")
    control.finished(outcome=Outcome.COMPLETE)
    assert control.state is State.FINISHED
    with pytest.raises(WrongState, match="finished"):
        control.start_at_pulse(11, output_file="run2.h5")


def test_a_start_without_its_own_output_file_is_the_last_one():
    control = WriterControl("default.h5")
    control.start_at_pulse(10, output_file="run1.h5")
    control.finished(outcome=Outcome.FAILED)
    start = control.start_at_pulse(11)
    assert not start.persistent and start.output_file == "default.h5"
    control.finished(outcome=Outcome.COMPLETE)
    assert control.state is State.FINISHED
    assert control.outcome is Outcome.COMPLETE and control.exit_outcome is Outcome.FAILED  # the worst run counts


def test_an_error_in_a_persistent_run_is_reported_and_the_writer_waits():
    control = WriterControl("default.h5")
    control.start_now(1.0, output_file="run1.h5")
    control.finishing("writer_error")
    control.finished("OSError: disk full", Outcome.FAILED)
    assert control.state is State.WAITING and control.error == "OSError: disk full"
    control.start_now(2.0, output_file="run2.h5")
    assert control.error is None


# -- the pulse range ---------------------------------------------------------------
def feed(pulse_range: PulseRange, pulse_ids, timestamp=lambda p: float(p)):
    written, found = [], []
    for pulse_id in pulse_ids:
        verdict = pulse_range.classify(pulse_id, timestamp(pulse_id))
        if verdict is Verdict.WRITE:
            written.append(pulse_id)
            found += pulse_range.written(pulse_id, timestamp(pulse_id))
        if pulse_range.complete:
            break
    return written, found


def as_tuples(items):
    return [(item.first_pulse_id, item.last_pulse_id, item.count, item.reason) for item in items]


def test_range_is_inclusive_and_complete_at_the_stop():
    pulse_range = PulseRange(start_pulse_id=10, stop_pulse_id=14)
    written, found = feed(pulse_range, range(5, 30))
    assert written == [10, 11, 12, 13, 14] and found == []
    assert pulse_range.complete and pulse_range.progress() == 1.0
    assert pulse_range.close("source_silent") == []


def test_classify():
    pulse_range = PulseRange(start_pulse_id=10, stop_pulse_id=20)
    assert pulse_range.classify(9, 0.0) is Verdict.BEFORE
    assert pulse_range.classify(10, 0.0) is Verdict.WRITE
    pulse_range.written(12, 0.0)
    assert pulse_range.classify(12, 0.0) is Verdict.OLD
    assert pulse_range.classify(11, 0.0) is Verdict.OLD
    assert not pulse_range.complete
    assert pulse_range.classify(21, 0.0) is Verdict.AFTER
    assert pulse_range.complete


def test_range_by_time():
    pulse_range = PulseRange(start_time=100.0)
    assert pulse_range.classify(1, 99.99) is Verdict.BEFORE
    assert pulse_range.classify(2, 100.0) is Verdict.WRITE
    pulse_range.written(2, 100.0)
    assert pulse_range.progress() is None  # no stop yet
    pulse_range.set_stop(None, 110.0)
    assert pulse_range.progress() == 0.0
    pulse_range.written(3, 105.0)
    assert pulse_range.progress() == pytest.approx(0.5)
    assert pulse_range.classify(4, 110.0) is Verdict.WRITE
    assert pulse_range.classify(4, 110.01) is Verdict.AFTER
    assert pulse_range.close("stopped") == []  # by time: no pulse ids to name


def test_jumps_are_recorded_once_with_counts():
    pulse_range = PulseRange(start_pulse_id=100, stop_pulse_id=120)
    written, found = feed(pulse_range, [100, 101, 102, 105, 106, 110, 120])
    assert written == [100, 101, 102, 105, 106, 110, 120]
    assert as_tuples(found) == [(103, 104, 2, "pulse_id_jump"), (107, 109, 3, "pulse_id_jump"),
                                (111, 119, 9, "pulse_id_jump")]
    assert pulse_range.missing_count == 14
    assert pulse_range.close("source_silent") == []


def test_a_slow_source_step_is_not_a_loss():
    # A 10 Hz source at SwissFEL advances by 10: only a skipped step is missing.
    pulse_range = PulseRange(start_pulse_id=1000, stop_pulse_id=1100)
    written, found = feed(pulse_range, [1000, 1010, 1020, 1040, 1050, 1060, 1070, 1080, 1090, 1100])
    assert as_tuples(found) == [(1021, 1039, 1, "pulse_id_jump")]
    assert pulse_range.step == 10


def test_an_early_overestimated_step_is_corrected():
    pulse_range = PulseRange(start_pulse_id=0, stop_pulse_id=100)
    _, found = feed(pulse_range, [0, 5, 6, 7])
    assert as_tuples(found) == [(1, 4, 4, "pulse_id_jump")]


def test_gap_notices_are_clipped_and_not_counted_twice():
    pulse_range = PulseRange(start_pulse_id=100, stop_pulse_id=200)
    # The buffer no longer holds 90..149: only 100..149 concern this range.
    assert as_tuples(pulse_range.gap(90, 149, "before_buffer", None)) == [(100, 149, 50, "before_buffer")]
    written, found = feed(pulse_range, [150, 151, 152])
    assert found == []
    # The head is explained by the gap; only the tail is left for the end's reason.
    assert as_tuples(pulse_range.close("source_silent")) == [(153, 200, 48, "source_silent")]
    # An eviction notice, then the jump it explains: recorded once, with the buffer's count.
    assert pulse_range.missing_count == 50 + 48


def test_a_gap_notice_explains_the_jump_that_follows():
    pulse_range = PulseRange(start_pulse_id=100, stop_pulse_id=200)
    feed(pulse_range, [150, 151, 152])
    assert as_tuples(pulse_range.gap(153, 160, "evicted", 8)) == [(153, 160, 8, "evicted")]
    _, found = feed(pulse_range, [161, 170])
    assert as_tuples(found) == [(162, 169, 8, "pulse_id_jump")]
    # Pulses already recorded are not recorded again, whoever reports them.
    assert pulse_range.gap(153, 160, "evicted", 8) == []
    assert as_tuples(pulse_range.gap(171, 175, "evicted", None)) == [(171, 175, 5, "evicted")]
    assert pulse_range.gap(171, 175, "evicted", None) == []
    assert pulse_range.gap(300, 400, "evicted", 101) == []  # outside the range
    assert pulse_range.gap(10, 20, "evicted", 11) == []


def test_head_and_tail_at_close():
    pulse_range = PulseRange(start_pulse_id=100, stop_pulse_id=200)
    feed(pulse_range, [105, 106, 107])
    assert pulse_range.progress() == pytest.approx(8 / 101)
    assert as_tuples(pulse_range.close("source_silent")) == [(100, 104, 5, "not_received"),
                                                            (108, 200, 93, "source_silent")]
    assert pulse_range.close("source_silent") == []  # recorded once


def test_a_message_past_the_stop_makes_the_tail_a_jump():
    pulse_range = PulseRange(start_pulse_id=100, stop_pulse_id=110)
    feed(pulse_range, [100, 101, 102, 115])
    assert pulse_range.complete
    assert as_tuples(pulse_range.close("stop_reached")) == [(103, 110, 8, "pulse_id_jump")]


def test_a_stop_time_before_the_stop_pulse_owes_no_tail():
    """stop_now on a range whose stop pulse lies far ahead: the pulses after the stop time
    were never part of the range, so nothing is missing (not ~1e9 'pulse_id_jump' pulses)."""
    ended_by_time = PulseRange(start_pulse_id=100, stop_pulse_id=10**9)
    feed(ended_by_time, [100, 101, 102])
    ended_by_time.set_stop(10**9, stop_time=102.5)  # PUT /stop_now at t = 102.5
    assert feed(ended_by_time, [103]) == ([], [])
    assert ended_by_time.complete
    assert ended_by_time.close("stop_reached") == [] and ended_by_time.missing_count == 0

    # The same when the source is silent after stop_now (the run ends without a later message).
    silent = PulseRange(start_pulse_id=100, stop_pulse_id=10**9)
    feed(silent, [100, 101, 102])
    silent.set_stop(10**9, stop_time=102.5)
    assert silent.close("stopped") == []

    # And when nothing of the range arrived before the stop time.
    empty = PulseRange(start_pulse_id=100, stop_pulse_id=10**9)
    empty.set_stop(10**9, stop_time=50.0)
    assert feed(empty, [100]) == ([], [])
    assert empty.close("stop_reached") == []

    # The stop pulse coming first still owes its tail, whatever the stop time.
    pulse_first = PulseRange(start_pulse_id=100, stop_pulse_id=110, stop_time=10**6)
    feed(pulse_first, [100, 101, 102, 115])
    assert as_tuples(pulse_first.close("stop_reached")) == [(103, 110, 8, "pulse_id_jump")]


def test_nothing_received():
    silent = PulseRange(start_pulse_id=100, stop_pulse_id=109)
    assert as_tuples(silent.close("source_silent")) == [(100, 109, 10, "source_silent")]
    passed = PulseRange(start_pulse_id=100, stop_pulse_id=109)
    assert passed.classify(500, 0.0) is Verdict.AFTER  # direct mode: the range is already over
    assert as_tuples(passed.close("stop_reached")) == [(100, 109, 10, "not_received")]
    no_stop = PulseRange(start_pulse_id=100)
    assert no_stop.close("stopped") == [] and no_stop.progress() is None


def test_source_reset_accepts_the_new_numbering():
    pulse_range = PulseRange(start_time=0.0)
    feed(pulse_range, [1000, 1001])
    assert pulse_range.classify(5, 1.0) is Verdict.OLD
    pulse_range.source_reset()
    written, found = feed(pulse_range, [5, 6, 7])
    assert written == [5, 6, 7] and found == []
    assert (pulse_range.first_pulse_id, pulse_range.last_pulse_id) == (1000, 7)


def test_a_stop_after_its_pulse_was_written_cuts_the_rows():
    # A past range: the replay ran ahead before the stop_pulse_id request arrived.
    pulse_range = PulseRange(start_pulse_id=100)
    _, found = feed(pulse_range, [100, 101, 102, 104, 105, 110, 111])
    assert [item.first_pulse_id for item in found] == [103, 106]
    assert pulse_range.set_stop(104, None) == 4  # keep 100, 101, 102, 104
    assert pulse_range.complete and pulse_range.rows == 4
    assert (pulse_range.last_pulse_id, pulse_range.last_timestamp) == (104, 104.0)
    assert as_tuples(pulse_range.missing) == [(103, 103, 1, "pulse_id_jump")]
    assert pulse_range.close("stopped") == []
    # A stop at or after the last row written cuts nothing.
    other = PulseRange(start_pulse_id=0)
    feed(other, [0, 1, 2])
    assert other.set_stop(2, None) is None and other.set_stop(50, None) is None


def test_a_late_stop_can_cut_everything_and_clip_a_jump():
    pulse_range = PulseRange(start_pulse_id=100)
    feed(pulse_range, [100, 101, 110])
    assert pulse_range.set_stop(105, None) == 2
    assert as_tuples(pulse_range.missing) == [(102, 105, 4, "pulse_id_jump")]
    by_time = PulseRange(start_time=0.0)
    feed(by_time, [7, 8, 9])
    assert by_time.set_stop(None, 6.5) == 0
    assert by_time.first_pulse_id is None and by_time.missing == [] and by_time.rows == 0


def test_parameters_must_be_finite_and_shallow():
    control = WriterControl("out.h5")
    with pytest.raises(BadRequest, match="must be a finite number, not nan"):
        control.set_parameters({**PARAMETERS, "general/created": float("nan")})
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(BadRequest, match="nested more than 32 levels"):
        control.set_parameters({**PARAMETERS, "scan": deep})
    assert control.set_parameters({**PARAMETERS, "scan": [[1, 2], [3]]})["scan"] == [[1, 2], [3]]


def test_cut_records_the_rows_that_did_not_reach_the_file_and_close_the_rest():
    """A full disk: rows 0..4 of 10 are in the file; 5..9 and the tail up to the stop are missing (disk_full)."""
    pulse_range = PulseRange(start_pulse_id=100, stop_pulse_id=119)
    for pulse_id in range(100, 110):
        assert pulse_range.classify(pulse_id, 0.0) is Verdict.WRITE
        pulse_range.written(pulse_id, float(pulse_id))
    assert [(m.first_pulse_id, m.last_pulse_id, m.count, m.reason) for m in pulse_range.cut(5, "disk_full")] == \
        [(105, 109, 5, "disk_full")]
    assert (pulse_range.rows, pulse_range.last_pulse_id, pulse_range.cut(5, "disk_full")) == (5, 104, [])
    assert [(m.first_pulse_id, m.last_pulse_id, m.count) for m in pulse_range.close("disk_full")] == [(110, 119, 10)]
    assert pulse_range.missing_count == 15 and not pulse_range.complete
