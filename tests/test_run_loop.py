"""The writer's run loop on a fake clock: when a quiet source ends a run, without waiting real seconds.

The source is scripted: it hands out its events, and once they are used up
each receive "waits" its timeout by moving the fake clock on. The output
is the real ``/dev/null`` output (NullOutput), or a real H5File where
/missing is what is checked; the decisions under test are
``writer.acquisition.SilenceWatch`` and ``writer.pulse_range.PulseRange`` as
the loop applies them.
"""
from __future__ import annotations

import queue

import h5py
import pytest

from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.h5.file import H5File
from sf_bsread_writer.replay.messages import BufferLost, Data, Gap, MissingRange
from sf_bsread_writer.writer.acquisition import (
    STOP_NOW_SILENCE,
    EndRun,
    MoveStop,
    SilenceWatch,
)
from sf_bsread_writer.writer.outputs import NullOutput
from sf_bsread_writer.writer.pulse_range import PulseRange
from sf_bsread_writer.writer.run_loop import POLL_INTERVAL, RunCounters, RunLoop
from tests.helpers import FakeClock, ScriptedSource

CHANNELS = [{"name": "VALUE", "type": "float64", "shape": [1]}]


def data(pulse_id: int, timestamp: float = 1.0e9) -> Data:
    return Data(pulse_id, build_message(pulse_id, CHANNELS, [pulse_id * 0.5], timestamp=timestamp + pulse_id * 0.01))


def make_loop(source, clock, pulse_range, stop_deadline=10.0, commands=None):
    finishing: list[str] = []
    commands = commands if commands is not None else queue.SimpleQueue()
    loop = RunLoop(source, NullOutput(), pulse_range, RunCounters(), commands, stop_deadline,
                   finishing.append, clock)
    return loop, finishing


def test_a_silent_source_ends_the_run_after_the_stop_deadline():
    clock = FakeClock()
    source = ScriptedSource(clock, [data(1), data(2), data(3)])
    loop, finishing = make_loop(source, clock, PulseRange(start_pulse_id=1, stop_pulse_id=10), stop_deadline=10.0)
    last_data = clock.now
    assert loop.run() == "source_silent"
    assert finishing == ["source_silent"]
    # At the first idle poll past 10 s after the last message: not before, not a poll later.
    assert 10.0 <= clock.now - last_data <= 10.0 + POLL_INTERVAL + 1e-9
    assert loop.range.missing == [MissingRange(4, 10, 7, "source_silent")]
    assert loop.counters.messages_written == 3 and loop.output.rows == 3


def test_stop_now_gives_a_quiet_source_one_second_not_the_whole_deadline():
    clock = FakeClock()
    commands: queue.SimpleQueue = queue.SimpleQueue()

    def stop_now() -> Data:
        commands.put(MoveStop(None, 1.0e9 + 100, now=True))  # posted while the source delivers pulse 2
        return data(2)

    source = ScriptedSource(clock, [data(1), stop_now])
    loop, _ = make_loop(source, clock, PulseRange(start_time=0.0), stop_deadline=30.0, commands=commands)
    started = clock.now
    assert loop.run() == "source_silent"
    assert STOP_NOW_SILENCE <= clock.now - started <= STOP_NOW_SILENCE + POLL_INTERVAL + 1e-9
    assert source.stops == [(None, 1.0e9 + 100)]


def test_without_a_stop_a_quiet_source_keeps_the_run_open():
    clock = FakeClock()
    commands: queue.SimpleQueue = queue.SimpleQueue()

    def after_a_minute(source: ScriptedSource) -> None:
        if source.idle_polls == 600:
            commands.put(EndRun("stopped"))  # GET /stop, a minute of fake time later

    source = ScriptedSource(clock, [data(1)], on_idle=after_a_minute)
    loop, _ = make_loop(source, clock, PulseRange(start_pulse_id=1), stop_deadline=10.0, commands=commands)
    assert loop.run() == "stopped"
    assert source.idle_polls == 600


def test_a_buffer_that_stays_lost_ends_the_run_as_buffer_lost():
    clock = FakeClock()
    source = ScriptedSource(clock, [data(1), BufferLost(5.0)])
    loop, _ = make_loop(source, clock, PulseRange(start_pulse_id=1, stop_pulse_id=5), stop_deadline=10.0)
    assert loop.run() == "buffer_lost"
    assert loop.counters.buffer_lost == 1
    # Data after a lost buffer means it came back: silence is the source's again.
    source = ScriptedSource(clock, [data(1), BufferLost(5.0), data(2)])
    loop, _ = make_loop(source, clock, PulseRange(start_pulse_id=1, stop_pulse_id=5), stop_deadline=10.0)
    assert loop.run() == "source_silent"


def test_the_write_rate_is_measured_on_the_loop_clock():
    clock = FakeClock()

    def later(pulse_id: int):
        def event() -> Data:
            clock.now += 0.01  # 100 Hz
            return data(pulse_id)
        return event

    source = ScriptedSource(clock, [later(pulse_id) for pulse_id in range(1, 301)])
    loop, _ = make_loop(source, clock, PulseRange(start_pulse_id=1, stop_pulse_id=300))
    assert loop.run() == "stop_reached"
    assert loop.counters.rate == pytest.approx(100.0, rel=0.02)
    assert loop.average_rate() == pytest.approx(100.0, rel=0.02)


# -- SilenceWatch alone ------------------------------------------------------------
def test_silence_watch_counts_from_the_later_of_data_and_stop():
    watch = SilenceWatch(stop_deadline=10.0, now=0.0)
    assert watch.end_reason(100.0, has_stop=False) is None  # no stop: never by silence
    watch.data(5.0)
    watch.stop_moved(12.0, at_once=False)  # a stop set long after the source went quiet
    assert watch.end_reason(22.0, has_stop=True) is None
    assert watch.end_reason(22.1, has_stop=True) == "source_silent"
    watch.stop_moved(30.0, at_once=True)  # stop_now: one second is enough
    assert watch.end_reason(31.0, has_stop=True) is None
    assert watch.end_reason(31.1, has_stop=True) == "source_silent"
    watch.buffer_lost()
    assert watch.end_reason(31.1, has_stop=True) == "buffer_lost"
    watch.data(40.0)
    assert watch.end_reason(41.5, has_stop=True) == "source_silent"


def test_silence_watch_never_waits_longer_after_stop_now_than_the_deadline():
    watch = SilenceWatch(stop_deadline=0.5, now=0.0)
    watch.stop_moved(0.0, at_once=True)
    assert watch.end_reason(0.5, has_stop=True) is None
    assert watch.end_reason(0.6, has_stop=True) == "source_silent"


def test_the_write_rate_falls_to_zero_when_nothing_is_written():
    clock = FakeClock()
    commands: queue.SimpleQueue = queue.SimpleQueue()

    def later(pulse_id: int):
        def event() -> Data:
            clock.now += 0.01
            return data(pulse_id)
        return event

    rates: list[float] = []

    def watch(source: ScriptedSource) -> None:  # idle: nothing arrives any more
        rates.append(loop.counters.rate)
        if source.idle_polls == 30:
            commands.put(EndRun("stopped"))

    source = ScriptedSource(clock, [later(pulse_id) for pulse_id in range(1, 201)], on_idle=watch)
    loop, _ = make_loop(source, clock, PulseRange(start_pulse_id=1), commands=commands)
    assert loop.run() == "stopped"
    assert rates[0] == pytest.approx(100.0, rel=0.05)  # still writing a moment ago
    assert rates[-1] == 0.0  # three seconds of silence later


def test_messages_that_are_not_written_do_not_keep_the_rate_up():
    clock = FakeClock()

    def later(pulse_id: int):
        def event() -> Data:
            clock.now += 0.01
            return data(pulse_id)
        return event

    # 100 rows, then 2 s of messages that are not written (pulse ids already written), then the stop.
    events = [later(p) for p in range(1, 101)] + [later(50) for _ in range(200)] + [later(300)]
    source = ScriptedSource(clock, events)
    loop, _ = make_loop(source, clock, PulseRange(start_pulse_id=1, stop_pulse_id=200))
    assert loop.run() == "stop_reached"
    assert loop.counters.messages_out_of_order == 200
    assert loop.counters.rate == 0.0


def test_a_long_run_logs_its_progress_and_header_changes(caplog):
    clock = FakeClock()
    other = [{"name": "OTHER", "type": "int32", "shape": [1]}]

    def later(pulse_id: int, channels=CHANNELS):
        def event() -> Data:
            clock.now += 1.0  # 1 Hz: a long run
            return Data(pulse_id, build_message(pulse_id, channels, [pulse_id], timestamp=1.0e9 + pulse_id))
        return event

    events = [later(p) for p in range(1, 16)] + [later(16, other)] + [later(p) for p in range(17, 26)]
    source = ScriptedSource(clock, events)
    loop, _ = make_loop(source, clock, PulseRange(start_pulse_id=1, stop_pulse_id=25))
    with caplog.at_level("INFO", logger="sf_bsread_writer.writer"):
        assert loop.run() == "stop_reached"
    progress = [r.getMessage() for r in caplog.records if "rows written" in r.getMessage()]
    assert len(progress) == 2 and progress[0].startswith("10 rows written, last pulse_id 10")
    assert "40 % done" in progress[0]
    assert [r.getMessage() for r in caplog.records if "data header changed" in r.getMessage()] == [
        "data header changed at pulse_id 16: 1 channels", "data header changed at pulse_id 17: 1 channels"]


# -- the time a range by time compares (bsread.timebase) ----------------------------
def _zero_clock_data(pulse_id: int, time: float | None = None) -> Data:
    """A message from a source without a clock (global timestamp 0), with the time the buffer sent."""
    return Data(pulse_id, build_message(pulse_id, CHANNELS, [pulse_id * 0.5], timestamp=0.0), time)


def test_a_range_by_time_uses_the_time_the_buffer_sends_and_says_which_base():
    clock = FakeClock()
    events = [_zero_clock_data(1, 99.0), _zero_clock_data(2, 100.5), data(3, 100.0), _zero_clock_data(4, 102.0)]
    source = ScriptedSource(clock, events)
    pulse_range = PulseRange(start_time=100.0, stop_time=101.0)
    loop, _ = make_loop(source, clock, pulse_range)
    assert loop.run() == "stop_reached"  # pulse 4's time is past the stop
    assert loop.counters.messages_before_start == 1 and loop.counters.messages_written == 2
    assert (pulse_range.first_timestamp, pulse_range.first_pulse_id) == (100.5, 2)
    # Pulse 2 was timed by the buffer's receive time, pulse 3 by its own (plausible) timestamp.
    assert loop.time_base == "mixed"


def test_a_direct_source_without_a_clock_is_timed_by_the_writers_receive_time():
    clock = FakeClock()
    wall = FakeClock(5000.0)
    source = ScriptedSource(clock, [_zero_clock_data(1), _zero_clock_data(2)])
    pulse_range = PulseRange(start_time=4000.0, stop_pulse_id=2)
    loop = RunLoop(source, NullOutput(), pulse_range, RunCounters(), queue.SimpleQueue(), 10.0, lambda reason: None,
                   clock, receive_clock=wall)
    assert loop.run() == "stop_reached"
    assert loop.counters.messages_written == 2 and loop.time_base == "receive"
    assert pulse_range.last_timestamp == 5000.0


# -- the missing pulses in a real file: one list, the range's ----------------------------
def test_a_late_stop_clips_the_missing_pulses_in_the_file_and_the_statistics_alike(tmp_path):
    """A stop that comes after its pulse was written: /missing, ``missing_pulses`` and the range agree.

    The jump and the gap are on disk (flushed every loop turn) before the
    stop moves back; the file's table is then rewritten with the clipped records.
    """
    clock = FakeClock()
    commands: queue.SimpleQueue = queue.SimpleQueue()

    def stop_at_12() -> Data:
        commands.put(MoveStop(12, None))  # posted while the source delivers pulse 16
        return data(16)

    events = [data(pulse_id) for pulse_id in (1, 2, 3, 4, 8)] + [
        Gap(9, 14, "evicted", 6), data(15), stop_at_12]
    source = ScriptedSource(clock, events)
    output = H5File(tmp_path / "late.h5", flush_interval=0.0, clock=clock)
    loop = RunLoop(source, output, PulseRange(start_pulse_id=1, stop_pulse_id=20), RunCounters(),
                   commands, 10.0, lambda reason: None, clock)
    assert loop.run() == "stop_reached"
    output.close()
    expected = [MissingRange(5, 7, 3, "pulse_id_jump"), MissingRange(9, 12, 4, "evicted")]
    assert loop.range.missing == expected
    with h5py.File(tmp_path / "late.h5", "r") as file:
        assert file["missing"][()].tolist() == [(5, 7, 3, b"pulse_id_jump"), (9, 12, 4, b"evicted")]
        assert file.attrs["missing_pulses"] == 7 == loop.range.missing_count
        assert file.attrs["number_of_messages"] == 5 and file.attrs["rows_removed_after_stop"] == 1
