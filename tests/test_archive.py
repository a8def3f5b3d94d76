"""The archive against a real nats-server: the buffer's archiver, ranges read back, hostile cases (docs/archive.md).

Every test starts its own ``nats-server -js`` on a free loopback port with
a store in ``tmp_path`` (``tests.helpers.NatsServer``) and a buffer
in-process (``tests.test_buffer.running_buffer``); the archiver is the
buffer's real child process. Nothing sleeps: conditions are polled.
"""
from __future__ import annotations

import json
import time
import subprocess
import sys

import pytest

from sf_bsread_writer.archive.records import ArchiveTarget
from sf_bsread_writer.core.protocol import build_message
from sf_bsread_writer.core.replay_messages import Data, End, Gap
from tests.helpers import NATS_SERVER, NatsServer, wait_for
from tests.test_buffer import as_bytes, push_source, running_buffer

pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="nats-server is not installed (Debian package "
                                "nats-server; .ci/run installs it)")

DEADLINE = 30.0
T0 = int(time.time())  # message times: a plausible source clock (the buffer keeps it)


def source_time(pulse_id: int) -> float:
    return T0 + (pulse_id % 1000) * 1e-3
CHANNELS = [{"name": "X", "type": "float64"}, {"name": "IMG", "type": "uint8", "shape": [300, 300]}]


def message(pulse_id: int, size: int = 90_000) -> list[bytes]:
    """A message with a scalar and a large part (kept by reference in the ring)."""
    import numpy as np
    image = np.full((300, 300), pulse_id % 251, dtype=np.uint8)
    return build_message(pulse_id, CHANNELS, [float(pulse_id), image], timestamp=(T0, (pulse_id % 1000) * 1_000_000))


def archive_status(buffer):
    return buffer.statistics().archive


def archived_up_to(buffer, pulse_id: int):
    status = archive_status(buffer)
    return status is not None and status.last_archived_pulse_id == pulse_id and status


def read_range(url: str, start: int | None, stop: int | None, start_time: float | None = None,
               timeout: float = DEADLINE) -> list:
    from sf_bsread_writer.archive.reader import ArchiveSource
    events = []
    with ArchiveSource(url, start_pulse_id=start, stop_pulse_id=stop, start_time=start_time) as source:
        def ended():
            event = source.receive(0.2)
            if event is not None:
                events.append(event)
            return isinstance(event, End)
        wait_for(ended, timeout, message="the archive range's end")
    return events


@pytest.fixture
def nats_server(tmp_path):
    with NatsServer(tmp_path / "nats") as server:
        yield server


def test_every_message_the_ring_accepts_is_archived_byte_identical_and_read_back(nats_server):
    with push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=nats_server.url, name="T1") as buffer:
        sent = {pulse_id: message(pulse_id) for pulse_id in range(100, 160)}
        for frames in sent.values():
            source.send_multipart(frames)
        status = wait_for(lambda: archived_up_to(buffer, 159), DEADLINE, message="pulse 159 archived")
        assert status.archived == 60 and status.lost == 0 and status.oversize == 0
        assert status.state == "archiving" and status.stream == "sfbs_T1"
        wait_for(lambda: archive_status(buffer).last_pulse_id == 159 and archive_status(buffer).lag_messages == 0,
                 DEADLINE, message="the archive's own figures")
        assert archive_status(buffer).first_pulse_id == 100
        url = f"{nats_server.url}/T1"
    events = read_range(url, 120, 129)  # the buffer is gone: the archive alone
    data = [event for event in events if isinstance(event, Data)]
    assert [event.pulse_id for event in data] == list(range(120, 130))
    for event in data:
        assert as_bytes(event.frames) == sent[event.pulse_id]
        assert event.time == source_time(event.pulse_id)
    assert events[-1] == End("stop_pulse_id", 129)
