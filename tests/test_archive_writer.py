"""Writers and the archive against a real nats-server: reach-back past the ring, and ``nats://`` writers alone.

A buffer with a small ring (20 messages) archives into its own nats-server;
writers started exactly as today (the buffer's replay endpoint) get pulses
older than the ring from the archive, in the same file, and the file says
which pulses came from where. ``sf_bsread_writer nats://HOST:PORT/NAME``
writes from the archive alone, with the buffer stopped.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal

import h5py
import pytest

from sf_bsread_writer.writer.service import Writer, WriterSettings
from tests.helpers import NATS_SERVER, NatsServer, imported_after_the_drop, wait_for
from tests.test_archive import DEADLINE, archived_up_to, message, newest_stored, source_time
from tests.test_buffer import push_source, running_buffer
from tests.test_writer import PARAMETERS, in_process_writer, shared_directory, writer_process  # noqa: F401

pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="nats-server is not installed (Debian package "
                                "nats-server; .ci/run installs it)")

RING = 20


@pytest.fixture
def nats_server(tmp_path):
    with NatsServer(tmp_path / "nats") as server:
        yield server


def rows(path) -> dict:
    with h5py.File(path, "r") as file:
        return {"pulse_id": file["data/X/pulse_id"][()].tolist(), "x": file["data/X/data"][()].ravel().tolist(),
                "img": file["data/IMG/data"][()], "attrs": dict(file.attrs),
                "missing": file["missing"][()].tolist() if "missing" in file else []}


def fill(source, buffer, first: int, last: int) -> None:
    """Pulses first..last into the buffer, at most half a ring ahead of the archive (nothing lost on the way).

    Paced on what the broker holds (``newest_stored``), then the buffer's statistics are awaited once: they
    say the last pulse archived and nothing lost.
    """
    wait_for(lambda: buffer.statistics().archive.state == "archiving", DEADLINE, message="the archiver running")
    for chunk in range(first, last + 1, RING // 2):
        chunk_last = min(chunk + RING // 2 - 1, last)
        for pulse_id in range(chunk, chunk_last + 1):
            source.send_multipart(message(pulse_id))
        wait_for(lambda: (newest_stored(buffer) or 0) >= chunk_last, DEADLINE, message=f"pulse {chunk_last} stored")
    wait_for(lambda: archived_up_to(buffer, last), DEADLINE, message=f"pulse {last} archived")
    assert buffer.statistics().archive.lost == 0


@contextlib.contextmanager
def archiver_paused(buffer):
    """SIGSTOP the buffer's archiver child (by its pid): the ring goes on, the archive does not; SIGCONT after."""
    pid = buffer._children["archiver"].process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_writer_started_as_today_reaches_past_the_ring_into_the_archive(nats_server, tmp_path):
    output = tmp_path / "reach.h5"
    with push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=nats_server.url, name="RB",
                           buffer_length=RING) as buffer:
        fill(source, buffer, 1000, 1099)
        with archiver_paused(buffer):
            for pulse_id in range(1100, 1110):  # in the ring (1090..1109), not in the archive
                source.send_multipart(message(pulse_id))
            wait_for(lambda: buffer.statistics().ring.newest_pulse_id == 1109, DEADLINE, message="1109 in the ring")
            wait_for(lambda: buffer.statistics().archive.lag_messages == 10, DEADLINE, message="the lag shown")
            with in_process_writer(buffer.replay_address, output) as (writer, client):
                client.set_parameters(PARAMETERS)
                started = writer.start_at_pulse(1010)
                assert started.warning is None  # the archive has them: no "before_buffer" warning
                writer.stop_at_pulse(1105)
                assert writer.done.wait(DEADLINE)
                statistics = writer.statistics()
    assert statistics.outcome == "complete", statistics
    written = rows(output)
    assert written["pulse_id"] == list(range(1010, 1106))
    assert written["x"] == [float(p) for p in range(1010, 1106)]
    assert all((written["img"][row] == pulse_id % 251).all() for row, pulse_id in enumerate(written["pulse_id"]))
    assert json.loads(written["attrs"]["pulse_sources"]) == [
        {"origin": "archive", "first_pulse_id": 1010, "last_pulse_id": 1099, "count": 90},
        {"origin": "ring", "first_pulse_id": 1100, "last_pulse_id": 1105, "count": 6}]
    assert written["attrs"]["outcome"] == "complete" and written["missing"] == []


def test_a_range_by_time_reaches_back_too(nats_server, tmp_path):
    output = tmp_path / "time.h5"
    now = [source_time(2005) - 1e-4]  # the writer's wall clock, as start_now/stop_now read it
    with push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=nats_server.url, name="RT",
                           buffer_length=RING) as buffer:
        fill(source, buffer, 2000, 2079)
        writer = Writer(WriterSettings(buffer.replay_address, str(output), finished_grace=0.0),
                        clock=lambda: now[0])
        try:
            writer.set_parameters(PARAMETERS)
            writer.start_now()
            now[0] = source_time(2070) + 1e-4
            writer.stop_now()
            assert writer.done.wait(DEADLINE)
        finally:
            writer.stop(wait=DEADLINE)
    written = rows(output)
    assert written["pulse_id"] == list(range(2005, 2071))
    assert json.loads(written["attrs"]["pulse_sources"])[0]["origin"] == "archive"


def test_pulses_the_archive_never_had_are_a_gap_with_its_reason(nats_server, tmp_path):
    output = tmp_path / "never.h5"
    with push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=nats_server.url, name="NV",
                           buffer_length=RING) as buffer:
        fill(source, buffer, 3000, 3059)
        with in_process_writer(buffer.replay_address, output) as (writer, client):
            client.set_parameters(PARAMETERS)
            writer.start_at_pulse(2990)  # the source began at 3000: the archive never had 2990..2999
            writer.stop_at_pulse(3050)
            assert writer.done.wait(DEADLINE)
            statistics = writer.statistics()
    written = rows(output)
    assert written["pulse_id"] == list(range(3000, 3051))
    assert statistics.outcome == "partial"
    missing = [(int(row[0]), int(row[1]), int(row[2]), row[3].decode() if isinstance(row[3], bytes) else row[3])
               for row in written["missing"]]
    assert missing == [(2990, 2999, 10, "before_archive")], missing


def test_a_nats_writer_writes_from_the_archive_alone_with_the_buffer_stopped(nats_server, tmp_path):
    with push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=nats_server.url, name="ALONE",
                           buffer_length=RING) as buffer:
        fill(source, buffer, 5000, 5099)
    output = tmp_path / "alone.h5"
    child, client = writer_process(f"{nats_server.url}/ALONE", output)
    with child:
        client.set_parameters(PARAMETERS)
        client.stop_pulse_id(5090)
        client.start_pulse_id(5003)
        assert child.wait(timeout=DEADLINE) == 0, child.output()
    written = rows(output)
    assert written["pulse_id"] == list(range(5003, 5091))
    assert written["attrs"]["outcome"] == "complete"
    assert json.loads(written["attrs"]["pulse_sources"]) == [
        {"origin": "archive", "first_pulse_id": 5003, "last_pulse_id": 5090, "count": 88}]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_a_nats_writer_as_another_user_imports_nothing_after_dropping_privileges(nats_server, shared_directory):
    """The archive reader (nats-py) loads on first use: a nats:// writer run as another user (USER_ID) must have
    it before the drop, when that user may not read the checkout (a 0700 clone, its venv inside)."""
    with push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=nats_server.url, name="NOBODY_USER",
                           buffer_length=RING) as buffer:
        fill(source, buffer, 6000, 6029)
    output = shared_directory / "as_nobody.h5"
    child, client = writer_process(f"{nats_server.url}/NOBODY_USER", output, user_id="65534", watch_imports=True)
    with child:
        client.stop_pulse_id(6020)
        client.start_pulse_id(6000)
        assert child.wait(timeout=DEADLINE) == 0, child.output()
        assert imported_after_the_drop(child) == []
    assert rows(output)["pulse_id"] == list(range(6000, 6021)) and output.stat().st_uid == 65534


def test_a_nats_writer_for_an_archive_that_does_not_exist_is_refused_at_start(nats_server, tmp_path):
    child, client = writer_process(f"{nats_server.url}/NOBODY", tmp_path / "none.h5")
    with child:
        client.set_parameters(PARAMETERS)
        with pytest.raises(Exception) as refused:
            client.start_pulse_id(1)
        assert "no stream sfbs_NOBODY" in str(refused.value)
    assert not (tmp_path / "none.h5").exists()


def test_the_archive_in_statistics_metrics_ctl_status_and_web_ranges(nats_server):
    import requests

    from sf_bsread_writer.tools import ctl
    from sf_bsread_writer.web.range_query import RangeLimits, RangeQuery
    from sf_bsread_writer.web.ranges import fetch_range

    with push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=nats_server.url, name="SHOW",
                           buffer_length=RING) as buffer:
        fill(source, buffer, 7000, 7059)
        wait_for(lambda: (buffer.statistics().archive.first_pulse_id, buffer.statistics().archive.last_pulse_id) ==
                 (7000, 7059), DEADLINE, message="the archive's range")
        statistics = requests.get(buffer.rest_url + "/statistics", timeout=DEADLINE).json()["statistics"]
        archive = statistics["archive"]
        assert (archive["first_pulse_id"], archive["last_pulse_id"], archive["lag_messages"], archive["lost"]) == \
            (7000, 7059, 0, 0)
        assert archive["url"] == f"{nats_server.url}/SHOW" and archive["state"] == "archiving"
        metrics = requests.get(buffer.rest_url + "/metrics", timeout=DEADLINE).text
        assert 'sf_bsread_buffer_archive_last_pulse_id{buffer="SHOW"} 7059' in metrics
        assert 'sf_bsread_buffer_archive_lost_pulses_total{buffer="SHOW"} 0' in metrics
        rows = dict(ctl._status_rows(buffer.statistics()))
        assert rows["archive"].startswith("archiving nats://") and rows["archive pulse ids"].startswith("7000 .. 7059")
        assert ctl.range_of(buffer.statistics(), None, 50) == (7010, 7059)  # older than the ring: the archive has it
        columns = fetch_range(buffer.replay_address, RangeQuery(("X",), start_pulse_id=7005, stop_pulse_id=7055),
                              RangeLimits(), timeout=DEADLINE)
        assert columns.pulse_ids.tolist() == list(range(7005, 7056)) and not columns.missing


def test_a_reader_overtaken_by_the_ring_gets_the_evicted_pulses_from_the_archive(nats_server):
    from sf_bsread_writer.archive.reach_back import ReachBackSource
    from sf_bsread_writer.replay.messages import Data, End, Gap

    with push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=nats_server.url, name="SLOW",
                           buffer_length=RING) as buffer:
        fill(source, buffer, 8000, 8009)
        events = []
        with ReachBackSource(buffer.replay_address, start_pulse_id=8000, stop_pulse_id=8099) as reader:
            reader.handshake(DEADLINE)
            wait_for(lambda: (event := reader.receive(0.2)) is not None and events.append(event) is None
                     and isinstance(event, Data), DEADLINE, message="the first pulse")
            fill(source, buffer, 8010, 8099)  # the ring (20) moves on under the reader
            wait_for(lambda: (event := reader.receive(0.2)) is not None and events.append(event) is None
                     and isinstance(event, End), DEADLINE, message="the end")
            sources = reader.pulse_sources
    assert [event.pulse_id for event in events if isinstance(event, Data)] == list(range(8000, 8100))
    assert not [event for event in events if isinstance(event, Gap)]
    assert {run["origin"] for run in sources} == {"ring", "archive"}
