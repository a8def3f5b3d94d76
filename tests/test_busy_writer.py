"""A writer busy with HDF5 for longer than the buffer's session timeout keeps its session (issue 24).

At 12 000 channels a writer created channel groups for 10-25 s before its
first row and sent the buffer nothing meanwhile; the buffer forgot the
session after 10 s of silence, the writer re-requested and found half of
the range evicted. Here the same class of stall, scaled down: the buffer
forgets a silent writer after 0.5 s and the writer's first block (1000
channel groups, then a block write) takes longer than that. A real
buffer (in this process), a real replay client, a real HDF5 file.
"""
from __future__ import annotations

import functools
import time

import h5py
import pytest

from sf_bsread_writer.archive.reach_back import ReachBackSource
from sf_bsread_writer.h5.file import H5File
from sf_bsread_writer.replay.client import ReplayClient
from sf_bsread_writer.writer.service import Writer, WriterSettings
from tests.helpers import STREAM_DEADLINE, Stream

FIRST_PULSE_ID = 70_000_000
CHANNELS = 1000
MESSAGES = 150  # more than a window (64): the writer is busy mid-range
SESSION_TIMEOUT = 0.5  # the buffer's; the client heartbeats every 0.1 s while it can


@pytest.mark.parametrize("kind", ["reach_back", "replay_client"])
def test_a_writer_busy_longer_than_the_session_timeout_keeps_its_session(tmp_path, kind):
    """``reach_back``: the writer's own source for a buffer (``ReachBackSource`` around the replay client);
    ``replay_client``: the replay client alone."""
    stream = Stream(count=MESSAGES, rate=0, profile="scalars", compression="none", n_channels=CHANNELS,
                    first_pulse_id=FIRST_PULSE_ID, session_timeout=SESSION_TIMEOUT)
    try:
        stream.wait_for_pulse(FIRST_PULSE_ID + MESSAGES - 1)
        last = FIRST_PULSE_ID + MESSAGES - 1
        flushes: list[float] = []

        def source(start):
            client = functools.partial(ReplayClient, heartbeat_interval=0.1)
            if kind == "reach_back":
                return ReachBackSource(stream.replay, start_pulse_id=start.start_pulse_id,
                                       stop_pulse_id=start.stop_pulse_id, replay_factory=client)
            return client(stream.replay, start_pulse_id=start.start_pulse_id, stop_pulse_id=start.stop_pulse_id)

        def output(start):
            file = H5File(start.output_file, flush_interval=0.05)
            flush = file.flush

            def timed_flush():  # the real flush, timed: the stall this test is about must happen
                began = time.monotonic()
                flush()
                flushes.append(time.monotonic() - began)

            file.flush = timed_flush
            return file

        writer = Writer(WriterSettings(stream.replay, str(tmp_path / "busy.h5"), finished_grace=0.0),
                        source_factory=source, output_factory=output)
        try:
            writer.stop_at_pulse(last)
            writer.start_at_pulse(FIRST_PULSE_ID)
            assert writer.done.wait(STREAM_DEADLINE)
            statistics = writer.statistics()
        finally:
            writer.stop(wait=STREAM_DEADLINE)
        replay = stream.buffer.statistics().replay
    finally:
        stream.close()
    assert max(flushes) > SESSION_TIMEOUT, f"the writer was never busy for longer than the session timeout: {flushes}"
    # One session from start to end: never forgotten, never asked again.
    assert (replay.started, replay.expired, replay.lost) == (1, 0, 0), replay
    assert (statistics.outcome, statistics.messages_written) == ("complete", MESSAGES), statistics
    with h5py.File(tmp_path / "busy.h5", "r") as file:
        assert file["data/SCALAR:CH0999/pulse_id"][()].tolist() == list(range(FIRST_PULSE_ID, last + 1))
