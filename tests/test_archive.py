"""The archive against a real nats-server: the buffer's archiver, ranges read back, hostile cases (docs/archive.md).

Every test starts its own ``nats-server -js`` on a free loopback port with
a store in ``tmp_path`` (``tests.helpers.NatsServer``) and a buffer
in-process (``tests.test_buffer.running_buffer``); the archiver is the
buffer's real child process. Nothing sleeps: conditions are polled.
"""
from __future__ import annotations

import time

import pytest

from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.replay.messages import Data, End, Gap
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


def newest_stored(buffer) -> int | None:
    """The newest pulse id in the buffer's archive, read from the broker itself: what a test paces a source on.

    The buffer's statistics say it too, but only in the snapshot after the archiver's next report (each
    published every 0.25 s): waiting on them costs up to half a second per wait.
    """
    import asyncio

    from sf_bsread_writer.archive.reader import ArchiveUnavailable, connect, record_at, stored_bounds
    from sf_bsread_writer.archive.records import ArchiveTarget

    target = ArchiveTarget.parse(buffer.settings.archive, buffer.settings.name)

    async def newest() -> int | None:
        connection = await connect(target, max_reconnect_attempts=0)
        try:
            js = connection.jetstream()
            first, last = await stored_bounds(js, target)
            found = await record_at(js, target, last) if first <= last else None
        finally:
            await connection.close()
        if found is None:
            return None
        record = found[0]
        return record.gap_last_pulse_id if record.kind == "gap" else record.pulse_id

    try:
        return asyncio.run(newest())
    except ArchiveUnavailable:  # no stream yet
        return None


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


# ---------------------------------------------------------------------------
# Bad and hostile cases
# ---------------------------------------------------------------------------
SMALL = [{"name": "X", "type": "float64"}]


def small_message(pulse_id: int) -> list[bytes]:
    return build_message(pulse_id, SMALL, [float(pulse_id)], timestamp=(T0, (pulse_id % 1000) * 1_000_000))


def archiving(buffer):
    status = archive_status(buffer)
    return status is not None and status.state == "archiving"


def stored_count(url: str, first: int, last: int) -> list:
    return [event.pulse_id for event in read_range(url, first, last) if isinstance(event, Data)]


def test_broker_down_at_start_the_buffer_starts_says_so_and_catches_up(tmp_path):
    from tests.helpers import free_port
    port = free_port()
    with push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=f"nats://127.0.0.1:{port}", name="DOWN") as buffer:
        wait_for(lambda: archive_status(buffer).state == "broker_unreachable", DEADLINE,
                 message="the archive saying the broker is unreachable")
        for pulse_id in range(1, 31):
            source.send_multipart(small_message(pulse_id))
        wait_for(lambda: buffer.statistics().ring.newest_pulse_id == 30, DEADLINE, message="ingest going on")
        with NatsServer(tmp_path / "nats", port=port):
            status = wait_for(lambda: archived_up_to(buffer, 30), DEADLINE, message="the catch-up")
            assert status.archived == 30 and status.lost == 0 and status.state == "archiving"
            assert stored_count(f"nats://127.0.0.1:{port}/DOWN", 1, 30) == list(range(1, 31))


def test_broker_killed_and_back_nothing_lost_nothing_twice(nats_server):
    with push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=nats_server.url, name="KILL") as buffer:
        wait_for(lambda: archiving(buffer), DEADLINE, message="archiving")
        for pulse_id in range(1, 21):
            source.send_multipart(small_message(pulse_id))
        wait_for(lambda: archived_up_to(buffer, 20), DEADLINE, message="20 archived")
        nats_server.kill()
        for pulse_id in range(21, 61):  # the ring keeps them meanwhile
            source.send_multipart(small_message(pulse_id))
        wait_for(lambda: buffer.statistics().ring.newest_pulse_id == 60, DEADLINE, message="ingest going on")
        wait_for(lambda: archive_status(buffer).state == "broker_unreachable", DEADLINE, message="the outage seen")
        nats_server.start()
        status = wait_for(lambda: archived_up_to(buffer, 60), DEADLINE, message="the catch-up")
        assert status.lost == 0
        wait_for(lambda: archive_status(buffer).stored_messages == 60, DEADLINE, message="60 stored, none twice")
    assert stored_count(f"{nats_server.url}/KILL", 1, 60) == list(range(1, 61))


def test_pulses_the_ring_lost_while_the_broker_was_away_are_counted_and_marked(nats_server):
    with push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=nats_server.url, name="LOST",
                           buffer_length=10) as buffer:
        wait_for(lambda: archiving(buffer), DEADLINE, message="archiving")
        for pulse_id in range(1, 6):
            source.send_multipart(small_message(pulse_id))
        wait_for(lambda: archived_up_to(buffer, 5), DEADLINE, message="5 archived")
        nats_server.kill()
        for pulse_id in range(6, 56):  # the ring (10) keeps 46..55: 6..45 are lost for the archive
            source.send_multipart(small_message(pulse_id))
        wait_for(lambda: buffer.statistics().ring.newest_pulse_id == 55, DEADLINE, message="ingest going on")
        wait_for(lambda: archive_status(buffer).state == "broker_unreachable", DEADLINE, message="the outage seen")
        nats_server.start()
        status = wait_for(lambda: archived_up_to(buffer, 55), DEADLINE, message="the catch-up")
        assert status.lost == 40, status
    events = read_range(f"{nats_server.url}/LOST", 1, 55)
    assert [e.pulse_id for e in events if isinstance(e, Data)] == list(range(1, 6)) + list(range(46, 56))
    assert [e for e in events if isinstance(e, Gap)] == [Gap(6, 45, "not_archived", 40)]


def test_a_full_archive_discards_the_oldest_counted_never_the_newest(tmp_path):
    with NatsServer(tmp_path / "nats") as server, push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=server.url, name="FULL",
                           archive_max_bytes=1_000_000) as buffer:
        wait_for(lambda: archiving(buffer), DEADLINE, message="archiving")
        for pulse_id in range(1, 41):  # 40 x ~90 kB in a 1 MB archive
            source.send_multipart(message(pulse_id))
        status = wait_for(lambda: archived_up_to(buffer, 40), DEADLINE, message="40 archived")
        status = wait_for(lambda: (s := archive_status(buffer)).last_pulse_id == 40 and s.discarded and s,
                          DEADLINE, message="the discarded count")
        assert status.archived == 40 and status.discarded + status.stored_messages == 40
        assert status.first_pulse_id == status.discarded + 1 and status.stored_bytes <= 1_000_000
        events = read_range(f"{server.url}/FULL", 1, 40)
        assert events[0] == Gap(1, status.first_pulse_id - 1, "before_archive", None)
        assert [e.pulse_id for e in events if isinstance(e, Data)] == list(range(status.first_pulse_id, 41))


def test_a_message_over_the_brokers_limit_is_refused_for_the_archive_counted_and_kept_in_the_ring(tmp_path):
    from tests.test_buffer import replay_all
    with NatsServer(tmp_path / "nats", max_payload=64 * 1024) as server, push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=server.url, name="BIG") as buffer:
        wait_for(lambda: archiving(buffer), DEADLINE, message="archiving")
        source.send_multipart(small_message(1))
        source.send_multipart(message(2))  # ~90 kB: over the broker's 64 KiB
        source.send_multipart(small_message(3))
        status = wait_for(lambda: archived_up_to(buffer, 3), DEADLINE, message="3 archived")
        assert status.oversize == 1 and status.archived == 2
        assert [event.pulse_id for event in replay_all(buffer.replay_address, 1, 3)[0]] == [1, 2, 3]
        assert stored_count(f"{server.url}/BIG", 1, 3) == [1, 3]


def test_a_stream_of_the_same_name_with_other_settings_is_a_clear_error(nats_server):
    import asyncio

    import nats

    async def create_other() -> None:
        connection = await nats.connect(nats_server.url)
        await connection.jetstream().add_stream(name="sfbs_OTHER", subjects=["something.else"])
        await connection.close()

    asyncio.run(create_other())
    with push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=nats_server.url, name="OTHER") as buffer:
        status = wait_for(lambda: archive_status(buffer).state == "error" and archive_status(buffer), DEADLINE,
                          message="the conflict reported")
        assert "sfbs_OTHER" in status.error and "other settings" in status.error and "subjects" in status.error
        source.send_multipart(small_message(1))  # the buffer goes on
        wait_for(lambda: buffer.statistics().ring.newest_pulse_id == 1, DEADLINE, message="ingest going on")


def test_the_archiver_killed_restarts_and_resumes_without_duplicates(nats_server):
    with push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=nats_server.url, name="RESUME") as buffer:
        wait_for(lambda: archiving(buffer), DEADLINE, message="archiving")
        for pulse_id in range(1, 21):
            source.send_multipart(small_message(pulse_id))
        wait_for(lambda: archived_up_to(buffer, 20), DEADLINE, message="20 archived")
        child = buffer._children["archiver"]
        first = child.process
        first.kill()
        wait_for(lambda: child.process is not first and child.running, DEADLINE, message="the archiver restarted")
        for pulse_id in range(21, 41):
            source.send_multipart(small_message(pulse_id))
        status = wait_for(lambda: archived_up_to(buffer, 40), DEADLINE, message="40 archived")
        assert status.lost == 0 and status.unarchived_at_start == 0
        wait_for(lambda: archive_status(buffer).stored_messages == 40, DEADLINE, message="40 stored, none twice")


def test_a_stored_message_that_no_archiver_wrote_is_skipped_and_counted_by_a_reader(nats_server):
    import asyncio

    import nats

    from sf_bsread_writer.archive.reader import ArchiveSource
    from sf_bsread_writer.archive.records import encode_payload, message_headers

    async def publish() -> None:
        connection = await nats.connect(nats_server.url)
        js = connection.jetstream()
        await js.add_stream(name="sfbs_JUNK", subjects=["sfbs.JUNK.*"], allow_direct=True)
        await js.publish("sfbs.JUNK.msg", encode_payload(small_message(1)), headers=message_headers(1, 1.0))
        await js.publish("sfbs.JUNK.msg", b"not a message", headers=message_headers(2, 2.0))
        await js.publish("sfbs.JUNK.msg", b"SFBS1\n\xff\xff\xff\xff", headers={"Sf-Pulse-Id": "x"})
        await js.publish("sfbs.JUNK.msg", encode_payload(small_message(4)), headers=message_headers(4, 4.0))
        await connection.close()

    asyncio.run(publish())
    with ArchiveSource(f"{nats_server.url}/JUNK", start_pulse_id=1, stop_pulse_id=4) as source:
        events = []
        wait_for(lambda: (event := source.receive(0.2)) is not None and events.append(event) is None
                 and isinstance(event, End), DEADLINE, message="the end")
        assert [e.pulse_id for e in events if isinstance(e, Data)] == [1, 4]
        assert source.rejected == 2


def test_the_buffer_command_with_archive_options_and_its_archiver_child(nats_server):
    import requests

    from sf_bsread_writer.process import parse_ready
    from tests.helpers import Child, children_of, process_gone

    with Child.python_module("sf_bsread_writer.buffer", "tcp://127.0.0.1:1", "--name", "bad.name",
                             "--archive", nats_server.url) as child:
        assert child.wait(DEADLINE) == 2
        assert "may use only letters" in child.output()
    with push_source() as (source, address), \
            Child.python_module("sf_bsread_writer.buffer", address, "-o", "0", "--replay-port", "0", "--rest-port", "0",
                                "--name", "CLI", "--max-clock-skew", "1e9", "--archive", nats_server.url,
                                "--archive-max-bytes", "50000000", "--archive-max-age", "3600") as buffer:
        ready = parse_ready(buffer.wait_for_line("READY ", DEADLINE))
        statistics = lambda: requests.get(ready["rest"] + "/statistics", timeout=DEADLINE).json()["statistics"]
        wait_for(lambda: statistics()["archive"]["state"] == "archiving", DEADLINE, message="archiving")
        for pulse_id in range(1, 11):
            source.send_multipart(small_message(pulse_id))
        wait_for(lambda: statistics()["archive"]["last_archived_pulse_id"] == 10, DEADLINE, message="10 archived")
        archiver = children_of(buffer.process.pid, "sf_bsread_writer.archive.publisher")
        assert len(archiver) == 1
        buffer.signal(__import__("signal").SIGTERM)
        assert buffer.wait(DEADLINE) == 0
        wait_for(lambda: process_gone(archiver[0]), DEADLINE, message="the archiver gone with the buffer")
    info = read_range(f"{nats_server.url}/CLI", 1, 10)
    assert [event.pulse_id for event in info if isinstance(event, Data)] == list(range(1, 11))
