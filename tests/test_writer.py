"""The writer end to end: bsread's Sender (simulate) -> a real buffer -> the writer -> real HDF5 files.

One buffer ingests a mixed-profile stream (every type, a big-endian
channel, bitshuffle_lz4 arrays, a channel absent on most pulses) for the
whole module; each test writes a range of it and checks pulse ids and
values against ``simulate.expected_values``. Writers run as the real CLI
where the process matters (READY line, exit codes, signals, kill -9,
privileges) and in-process otherwise (faster on a shared machine).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (bitshuffle filter for reading)
import numpy as np
import pytest
import zmq

from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.client import WriterClient, WriterError
from sf_bsread_writer.httpserver import HttpServer
from sf_bsread_writer.tools.simulate import channel_metadata, expected_values
from sf_bsread_writer.writer.cli import drop_privileges, main
from sf_bsread_writer.writer.rest import make_app
from sf_bsread_writer.writer.service import Writer, WriterSettings
from tests.helpers import (
    Child,
    FakeClock,
    Stream,
    free_port,
    imported_after_the_drop,
    wait_for,
    writer_process,
)
from tests.test_buffer import push_source, running_buffer

PROFILE = "mixed"
COMPRESSION = "bitshuffle_lz4"
FIRST_PULSE_ID = 50_000_000
PARAMETERS = {"general/created": "2024-05-01T12:00:00", "general/user": "e12345",
              "general/process": "test_writer", "general/instrument": "simulation", "run/number": 7}
CHANNEL_NAMES = [entry["name"] for entry in channel_metadata(PROFILE, COMPRESSION)]
ALWAYS_PRESENT = "MIXED:FLOAT64"
DEADLINE = 60.0  # generous: a 2-core machine shared with other test suites


@pytest.fixture(scope="module")
def stream():
    stream = Stream(profile=PROFILE, compression=COMPRESSION, first_pulse_id=FIRST_PULSE_ID)
    try:
        stream.wait_for_pulse(FIRST_PULSE_ID + 150)
        yield stream
    finally:
        stream.close()


@contextlib.contextmanager
def in_process_writer(address: str, output_file: str | os.PathLike, monotonic=time.monotonic, **options):
    settings = WriterSettings(address, str(output_file), **{"finished_grace": 0.0, **options})
    writer = Writer(settings, monotonic=monotonic)
    server = HttpServer(make_app(writer), "127.0.0.1", 0).start()
    try:
        yield writer, WriterClient(server.url, timeout=DEADLINE)
    finally:
        writer.stop(wait=DEADLINE)
        server.stop()


def written_pulse_ids(path: str | os.PathLike) -> list[int]:
    with h5py.File(path, "r") as file:
        return file[f"data/{ALWAYS_PRESENT}/pulse_id"][()].tolist()


def assert_values(path: str | os.PathLike, pulse_ids: list[int], rows: int | None = None,
                  exact_length: bool = True) -> None:
    """Every channel has a row per pulse id, and the first ``rows`` rows (default all) hold what was sent.

    ``exact_length=False``: datasets may be longer (a file left by kill -9).
    """
    with h5py.File(path, "r") as file:
        for name in CHANNEL_NAMES:
            group = file["data"][name]
            present = group["is_data_present"][()]
            data = group["data"][()]
            stored_pulse_ids = group["pulse_id"][()]
            assert len(present) == len(pulse_ids) if exact_length else len(present) >= len(pulse_ids), name
            for row, pulse_id in enumerate(pulse_ids[:rows]):
                expected = expected_values(PROFILE, pulse_id)[name]
                if expected is None:
                    assert present[row] == 0 and stored_pulse_ids[row] == 0, (name, pulse_id)
                    continue
                assert present[row] == 1 and stored_pulse_ids[row] == pulse_id, (name, pulse_id)
                value = data[row]
                if isinstance(expected, str):
                    assert (value.decode() if isinstance(value, bytes) else value) == expected, (name, pulse_id)
                else:
                    assert np.array_equal(np.asarray(value).reshape(expected.shape), expected), (name, pulse_id)
                    assert np.asarray(value).dtype.newbyteorder("=") == expected.dtype.newbyteorder("="), name


def test_past_range_with_exact_values_through_the_cli(stream, tmp_path):
    """The point of the buffer: a range that was over before the writer started."""
    ring = stream.ring()
    start, stop = ring.oldest_pulse_id + 20, ring.oldest_pulse_id + 99
    assert stop < ring.newest_pulse_id
    output = tmp_path / "deep" / "past.h5"
    child, client = writer_process(stream.replay, output)
    with child:
        assert client.status() == "waiting"
        assert client.set_parameters(PARAMETERS) == PARAMETERS
        assert client.stop_pulse_id(stop) == "waiting"  # a stop before the start is fine
        assert client.start_pulse_id(start) in ("writing", "finishing", "finished")
        assert child.wait(timeout=DEADLINE) == 0, child.output()  # writes, closes, exits by itself
    assert "Closed" in child.output()
    assert written_pulse_ids(output) == list(range(start, stop + 1))
    assert_values(output, list(range(start, stop + 1)))
    with h5py.File(output, "r") as file:
        assert file["general/user"][()] == b"e12345" and file["general/instrument"][()] == b"simulation"
        assert file.attrs["requested_start_pulse_id"] == start and file.attrs["requested_stop_pulse_id"] == stop
        assert file.attrs["end_reason"] == "stop_reached" and file.attrs["complete"] == 1
        assert file.attrs["missing_pulses"] == 0 and "missing" not in file


def test_a_stop_pulse_that_arrives_after_it_was_written_cuts_the_file(stream, tmp_path):
    """start_pulse_id, then stop_pulse_id: the replay may run past the stop in between; the file ends at the stop."""
    start = stream.ring().oldest_pulse_id
    with in_process_writer(stream.replay, tmp_path / "late_stop.h5") as (writer, client):
        client.start_pulse_id(start)
        wait_for(lambda: client.statistics()["messages_written"] >= 60, timeout=DEADLINE, message="60 messages")
        client.stop_pulse_id(start + 29)
        assert client.wait_for("finished", timeout=DEADLINE) == "finished"
        statistics = client.statistics()
    assert (statistics["messages_written"], statistics["last_pulse_id"], statistics["missing_pulses"]) == \
        (30, start + 29, 0)
    assert written_pulse_ids(tmp_path / "late_stop.h5") == list(range(start, start + 30))
    assert_values(tmp_path / "late_stop.h5", list(range(start, start + 30)))
    with h5py.File(tmp_path / "late_stop.h5", "r") as file:
        assert file.attrs["number_of_messages"] == 30 and file.attrs["last_pulse_id"] == start + 29
        assert file.attrs["rows_removed_after_stop"] >= 30 and file.attrs["complete"] == 1


def test_two_writers_with_overlapping_ranges_at_once(stream, tmp_path):
    newest = stream.ring().newest_pulse_id
    ranges = [(newest - 120, newest + 30), (newest - 60, newest + 60)]  # past and future, overlapping
    with in_process_writer(stream.replay, tmp_path / "a.h5") as (_, first), \
            in_process_writer(stream.replay, tmp_path / "b.h5") as (_, second):
        for client, (start, stop) in zip((first, second), ranges):
            client.set_parameters(PARAMETERS)
            client.start_pulse_id(start)
            client.stop_pulse_id(stop)
        for client in (first, second):
            assert client.wait_for("finished", timeout=DEADLINE) == "finished"
        statistics = [first.statistics(), second.statistics()]
    for name, (start, stop), stats in zip(("a.h5", "b.h5"), ranges, statistics):
        expected = list(range(start, stop + 1))
        assert written_pulse_ids(tmp_path / name) == expected
        assert (stats["messages_written"], stats["missing_pulses"], stats["progress"]) == (len(expected), 0, 1.0)
        assert (stats["first_pulse_id"], stats["last_pulse_id"]) == (start, stop)
    assert_values(tmp_path / "b.h5", list(range(ranges[1][0], ranges[1][1] + 1)))


def test_start_and_stop_by_time(stream, tmp_path):
    with in_process_writer(stream.replay, tmp_path / "unused.h5") as (writer, client):
        assert client.start_now(output_file=str(tmp_path / "by_time.h5")) == "writing"
        wait_for(lambda: client.statistics()["messages_written"] >= 20, timeout=DEADLINE, message="20 messages")
        client.stop_now()
        assert client.wait_for("waiting", timeout=DEADLINE) == "waiting"  # its own output_file: persistent
        statistics = client.statistics()
        assert client.stop() == "finished"
    pulse_ids = written_pulse_ids(tmp_path / "by_time.h5")
    assert pulse_ids == list(range(pulse_ids[0], pulse_ids[0] + len(pulse_ids)))  # contiguous
    assert len(pulse_ids) == statistics["messages_written"] >= 20
    # The range applies to the messages' global timestamps.
    assert statistics["start_timestamp"] <= statistics["first_timestamp"]
    assert statistics["last_timestamp"] <= statistics["stop_timestamp"]
    with h5py.File(tmp_path / "by_time.h5", "r") as file:
        assert file.attrs["requested_start_time"] == statistics["start_timestamp"]
        assert file.attrs["requested_stop_time"] == statistics["stop_timestamp"]
        assert file.attrs["first_timestamp"] == statistics["first_timestamp"]
    assert statistics["end_reason"] == "stop_reached"
    assert not (tmp_path / "unused.h5").exists()
    assert_values(tmp_path / "by_time.h5", pulse_ids)


@pytest.mark.parametrize("how", ["stop", "kill", "SIGTERM", "SIGINT"])
def test_ending_mid_run_leaves_a_closed_readable_file(stream, tmp_path, how):
    output = tmp_path / f"{how}.h5"
    child, client = writer_process(stream.replay, output)
    with child:
        client.start_pulse_id(stream.ring().newest_pulse_id)  # open-ended: no stop pulse
        wait_for(lambda: client.statistics()["messages_written"] >= 10, timeout=DEADLINE, message="10 messages")
        if how == "stop":
            assert client.stop() == "finished"
        elif how == "kill":
            assert client.kill() == "finished"
        else:
            child.signal(getattr(signal, how))
        assert child.wait(timeout=DEADLINE) == 0
    pulse_ids = written_pulse_ids(output)
    assert len(pulse_ids) >= 10 and pulse_ids == list(range(pulse_ids[0], pulse_ids[0] + len(pulse_ids)))
    assert_values(output, pulse_ids, rows=20)
    with h5py.File(output, "r") as file:
        assert file.attrs["complete"] == 1
        assert file.attrs["end_reason"] == {"stop": "stopped", "kill": "killed"}.get(how, f"signal_{how}")


def test_kill_9_leaves_the_data_up_to_the_last_flush(stream, tmp_path):
    output = tmp_path / "sigkill.h5"
    child, client = writer_process(stream.replay, output, "--flush-interval", "0.2")
    with child:
        client.start_pulse_id(stream.ring().oldest_pulse_id)
        flushed = wait_for(lambda: client.statistics()["rows_flushed"] >= 50 and client.statistics()["rows_flushed"],
                           timeout=DEADLINE, message="50 rows flushed")
        child.signal(signal.SIGKILL)
        assert child.wait(timeout=DEADLINE) == -signal.SIGKILL
    # The writer's guardian undoes a flush the kill cut short (h5/guardian.py): the file is final once its
    # journal is gone.
    journal = output.parent / f".{output.name}.journal"
    wait_for(lambda: not journal.exists(), timeout=DEADLINE, message="the guardian to finish with the file")
    with h5py.File(output, "r") as file:  # opens without h5clear
        assert file.attrs["complete"] == 0
        rows = int(file.attrs["number_of_messages"])  # valid rows (datasets may be longer after a truncate)
    pulse_ids = written_pulse_ids(output)[:rows]
    assert rows >= flushed
    assert pulse_ids == list(range(pulse_ids[0], pulse_ids[0] + rows))
    assert_values(output, pulse_ids, rows=30, exact_length=False)


def test_a_source_that_dies_before_the_stop_pulse(tmp_path):
    first = 70_000_000
    dying = Stream(count=60, rate=0.0, first_pulse_id=first, profile=PROFILE, compression=COMPRESSION)  # sends 60 messages, then nothing
    run_clock = FakeClock()  # the writer's deadlines: moved on by the test once the source is quiet
    try:
        dying.wait_for_pulse(first + 59)
        with in_process_writer(dying.replay, tmp_path / "silent.h5", monotonic=run_clock,
                               stop_deadline=10.0) as (writer, client):
            client.start_pulse_id(first + 10)
            client.stop_pulse_id(first + 199)
            wait_for(lambda: client.statistics()["messages_written"] == 50, timeout=DEADLINE, message="50 rows")
            wait_for(lambda: run_clock.advance(0.5) or client.status() == "finished", timeout=DEADLINE,
                     message="the stop deadline")
            statistics = client.statistics()
    finally:
        dying.close()
    assert written_pulse_ids(tmp_path / "silent.h5") == list(range(first + 10, first + 60))
    assert statistics["end_reason"] == "source_silent"
    assert statistics["missing"] == [{"first_pulse_id": first + 60, "last_pulse_id": first + 199, "count": 140,
                                      "reason": "source_silent"}]
    assert 0 < statistics["progress"] < 1
    with h5py.File(tmp_path / "silent.h5", "r") as file:
        assert file["missing"][()].tolist() == [(first + 60, first + 199, 140, b"source_silent")]
        assert file.attrs["missing_pulses"] == 140 and file.attrs["complete"] == 1


def test_direct_mode_reads_a_plain_stream(stream, tmp_path):
    """--direct: no buffer in between; here the buffer's live output (PUB) is the plain bsread stream."""
    with in_process_writer(stream.output, tmp_path / "direct.h5", direct=True, direct_mode="sub") as (_, client):
        start = stream.ring().newest_pulse_id + 100  # live only: a start after the SUB has joined
        client.start_pulse_id(start)
        client.stop_pulse_id(start + 29)
        assert client.wait_for("finished", timeout=DEADLINE) == "finished"
        statistics = client.statistics()
        assert statistics["missing_pulses"] == 0, statistics
    assert written_pulse_ids(tmp_path / "direct.h5") == list(range(start, start + 30))
    assert_values(tmp_path / "direct.h5", list(range(start, start + 30)))


def test_a_message_larger_than_the_writer_takes_is_a_missing_pulse_never_its_bytes(tmp_path):
    """A buffer may hold messages larger than its writer takes (its --max-message-bytes is larger): the writer
    says its limit in the request and the buffer sends an ``oversize`` gap in the message's place. The file
    records that pulse missing with that reason and the outcome is partial, never complete; the other pulses
    are written. (Before: the message's bytes went to the writer, which took them whole and then rejected it.)"""
    limit = 10_000
    with push_source() as (source, address), running_buffer(address) as buffer:
        for pulse_id in range(1, 6):
            size = 3 * limit if pulse_id == 3 else 1
            source.send_multipart(build_message(pulse_id, [{"name": "X", "type": "int8", "shape": [size]}],
                                                [np.ones(size, dtype=np.int8)]))
        wait_for(lambda: buffer.statistics().received == 5, DEADLINE, message="5 messages in the ring")
        with in_process_writer(buffer.replay_address, tmp_path / "oversize.h5", max_message_bytes=limit) as (_, client):
            client.start_pulse_id(1)
            client.stop_pulse_id(5)
            assert client.wait_for("finished", timeout=DEADLINE) == "finished"
            statistics = client.statistics()
    assert statistics["outcome"] == "partial" and statistics["messages_rejected"] == 0, statistics
    assert statistics["missing"] == [{"first_pulse_id": 3, "last_pulse_id": 3, "count": 1, "reason": "oversize"}]
    with h5py.File(tmp_path / "oversize.h5", "r") as file:
        assert file["data/X/pulse_id"][()].tolist() == [1, 2, 4, 5]
        assert file["missing"][()].tolist() == [(3, 3, 1, b"oversize")]


def test_a_direct_source_connected_anew_after_an_oversize_part_is_counted_in_the_statistics(tmp_path):
    """--direct: ZeroMQ gives the stream's connection up after a part over twice --max-message-bytes and the
    source connects again; operators see it in the writer's /statistics (``source_reconnects``), not only the log."""
    limit = 10_000
    channels = [{"name": "X", "type": "int32"}]
    with push_source() as (source, address), \
            in_process_writer(address, tmp_path / "direct.h5", direct=True, max_message_bytes=limit) as (_, client):
        client.start_pulse_id(1)
        client.stop_pulse_id(1000)
        source.setsockopt(zmq.SNDTIMEO, int(DEADLINE * 1000))
        source.send_multipart(build_message(1, channels, [1]))
        wait_for(lambda: client.statistics()["messages_written"] == 1, DEADLINE, message="pulse 1")
        source.send_multipart(build_message(2, channels, [2])[:1] + [b"\0" * (3 * limit)])
        pulse_id = iter(range(3, 1000))

        def sent_and_written():  # what was queued for the dropped connection went with it
            try:
                source.send_multipart(build_message(next(pulse_id), channels, [0]), zmq.NOBLOCK)
            except zmq.Again:
                pass  # not connected again yet
            return client.statistics()["messages_written"] >= 2

        wait_for(sent_and_written, DEADLINE, interval=0.05, message="a message after the refused part")
        assert client.statistics()["source_reconnects"] == 1


def test_dev_null_consumes_without_writing(stream):
    ring = stream.ring()
    start = ring.oldest_pulse_id + 5
    with in_process_writer(stream.replay, "/dev/null") as (_, client):
        client.start_pulse_id(start)
        client.stop_pulse_id(start + 49)
        assert client.wait_for("finished", timeout=DEADLINE) == "finished"
        statistics = client.statistics()
    assert statistics["messages_written"] == 50 and statistics["bytes_written"] > 0
    assert statistics["output_file"] == "/dev/null"


def test_output_root_escape_is_refused_at_launch(stream, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with Child.python_module("sf_bsread_writer.writer", stream.replay, str(tmp_path / "outside.h5"), "-1", "0",
                             "--output-root", str(root)) as child:
        assert child.wait(timeout=DEADLINE) == 2
    assert "outside the output root" in child.output()
    assert not (tmp_path / "outside.h5").exists()


@pytest.fixture
def shared_directory():
    """A directory that another user can reach and write (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="sf_bsread_writer_test_"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_user_id_drops_privileges_and_says_when_it_cannot(stream, shared_directory):
    shared = shared_directory
    nobody = 65534
    child, client = writer_process(stream.replay, shared / "as_nobody.h5", user_id=str(nobody), watch_imports=True)
    with child:
        start = stream.ring().oldest_pulse_id
        client.start_pulse_id(start)
        client.stop_pulse_id(start + 9)
        assert child.wait(timeout=DEADLINE) == 0
        # Another user may not read the checkout (a 0700 clone): everything a run may need came before the drop.
        assert imported_after_the_drop(child) == []
    assert (shared / "as_nobody.h5").stat().st_uid == nobody
    assert written_pulse_ids(shared / "as_nobody.h5") == list(range(start, start + 10))



def test_a_user_switch_that_is_not_permitted_is_a_clear_error(monkeypatch, tmp_path, caplog):
    """As a plain user: the writer refuses to start (exit code 2) and says what to do."""
    def refuse(_: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    for name, value in (("getuid", lambda: 1000), ("geteuid", lambda: 1000), ("getgid", lambda: 1000),
                        ("setgid", refuse), ("setuid", refuse)):
        monkeypatch.setattr(os, name, value)
    with pytest.raises(PermissionError, match="cannot switch to uid 0 gid 0: Operation not permitted.*"
                                              "only root may change user: start as root or pass -1"):
        drop_privileges(0)
    assert main(["tcp://127.0.0.1:1", str(tmp_path / "never.h5"), "0", "0"]) == 2
    assert "only root may change user" in caplog.text
    assert not (tmp_path / "never.h5").exists()


# -- a start that cannot work says so at once ---------------------------------------
def test_a_writer_pointed_at_the_live_output_says_it_is_not_a_replay_endpoint(stream, tmp_path):
    """As users of the original will do: was 200 "writing", 0 rows, exit 0."""
    with in_process_writer(stream.output, tmp_path / "wrong.h5") as (writer, client):
        with pytest.raises(WriterError) as refused:
            client.start_pulse_id(FIRST_PULSE_ID)
        assert refused.value.http_status == 400
        assert "is not a replay endpoint" in refused.value.status and "--direct" in refused.value.status
        assert client.status() == "waiting" and not (tmp_path / "wrong.h5").exists()


def test_a_writer_pointed_at_nothing_says_nothing_answers(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    with in_process_writer(address, tmp_path / "nothing.h5", handshake_timeout=0.5) as (writer, client):
        with pytest.raises(WriterError) as refused:
            client.start_pulse_id(1)
        assert refused.value.http_status == 503 and f"nothing answers at {address} within 0.5 s" in refused.value.status
        assert not (tmp_path / "nothing.h5").exists()


def test_a_start_older_than_the_buffer_is_answered_with_a_warning(stream, tmp_path):
    with in_process_writer(stream.replay, tmp_path / "older.h5") as (writer, client):
        client.stop_pulse_id(FIRST_PULSE_ID + 9)
        answer = client._call("PUT", f"/start_pulse_id/{FIRST_PULSE_ID - 100}")
        assert answer["status"] in ("writing", "finishing", "finished")
        assert answer["warning"] == (f"pulses {FIRST_PULSE_ID - 100}..{FIRST_PULSE_ID - 1} are older than the "
                                     f"buffer's oldest pulse {FIRST_PULSE_ID} and will be missing (before_buffer)")
        assert writer.done.wait(DEADLINE) and writer.statistics().outcome == "partial" and writer.exit_code == 3


def test_a_range_gone_from_the_buffer_is_a_failed_acquisition(stream, tmp_path):
    """Was: 0 rows, end_reason stop_reached, exit 0."""
    with in_process_writer(stream.replay, tmp_path / "gone.h5") as (writer, client):
        client.stop_pulse_id(FIRST_PULSE_ID - 101)
        answer = client._call("PUT", f"/start_pulse_id/{FIRST_PULSE_ID - 200}")
        assert "nothing will be written (outcome failed)" in answer["warning"]
        assert writer.done.wait(DEADLINE)
        statistics = writer.statistics()
    assert (statistics.outcome, writer.exit_code, statistics.messages_written) == ("failed", 1, 0)
    with h5py.File(tmp_path / "gone.h5", "r") as file:
        assert file.attrs["outcome"] == "failed" and file.attrs["missing_pulses"] == 100


def test_the_writer_and_the_buffer_log_the_same_replay_session_id(stream, tmp_path, caplog):
    with caplog.at_level("INFO", logger="sf_bsread_writer"), \
            in_process_writer(stream.replay, tmp_path / "logged.h5") as (writer, client):
        start = stream.ring().oldest_pulse_id
        client.stop_pulse_id(start + 4)
        client.start_pulse_id(start)
        assert writer.done.wait(DEADLINE)
    requested = [r.getMessage() for r in caplog.records if r.name == "sf_bsread_writer.replay.client" and "requested" in
                 r.getMessage()]
    session_id = requested[0].split()[2].rstrip(":")
    assert len(session_id) == 16 and f"replay: session {session_id}: start pulse {start}" in caplog.text
    assert f"replay: session {session_id} ended (stop_pulse_id) after 5 messages" in caplog.text
    closed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Closed ")]
    assert len(closed) == 1 and ": complete, 5 messages" in closed[0]
