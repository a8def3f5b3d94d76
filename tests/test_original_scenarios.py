"""The original sf_bsread_writer's own integration scenarios, run against this product.

Each test drives the product the way the original's tests drove the
original (tests/test_integration.py, tests/test_writer.py and
tests/test_writer_format.py of paulscherrerinstitute/sf_bsread_writer):
bsread's own ``Sender`` as the source, the buffer and the writer as their
command-line processes, plain ``requests`` calls on the REST API, and
``h5py`` on the file. The assertions are the original's; where this
product answers differently on purpose, the test asserts the new answer and
names the difference, which README.md ("Coming from the original") lists.
"""
from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest
import requests

from sf_bsread_writer.process import parse_ready

from .helpers import Child, free_port, wait_for

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from bsread.sender import PUSH, Sender

DEADLINE = 60.0  # generous: a 2-core machine shared with other suites
PARAMETERS = {"general/created": "today", "general/user": "p11057", "general/process": "dia",
              "general/instrument": "jungfrau"}
ZERO_CLOCK = (0, 0)  # the original's writer test sends this global timestamp: a source without a clock


@contextlib.contextmanager
def source_stream() -> Iterator[Sender]:
    """bsread's Sender, PUSH on 127.0.0.1 (the original's tests: ``sender(port=..., mode=PUSH)``)."""
    sender = Sender(port=free_port(), address="tcp://127.0.0.1", mode=PUSH, queue_size=100, block=True)
    sender.open()
    try:
        yield sender
    finally:
        sender.close()


class Buffer:
    """``sf_bsread_buffer`` as a process on the sender, with the original's -b (here 100)."""

    def __init__(self, sender: Sender) -> None:
        self.child = Child.python_module("sf_bsread_writer.buffer", f"tcp://127.0.0.1:{sender.port}", "-o", "0",
                                         "-b", "100", "--replay-port", "0", "--rest-port", "0")
        ready = parse_ready(self.child.wait_for_line("READY ", timeout=DEADLINE))
        assert ready is not None
        self.replay, self.rest = ready["replay"], ready["rest"]

    def newest_pulse_id(self) -> int | None:
        return requests.get(f"{self.rest}/statistics", timeout=DEADLINE).json()["statistics"]["ring"][
            "newest_pulse_id"]

    def wait_for_pulse(self, pulse_id: int) -> None:
        wait_for(lambda: (self.newest_pulse_id() or -1) >= pulse_id, timeout=DEADLINE,
                 message=f"pulse {pulse_id} in the buffer")


class Writer:
    """``sf_bsread_writer STREAM OUTPUT_FILE USER_ID REST_PORT`` as a process, and its REST URL."""

    def __init__(self, replay: str, output_file: Path) -> None:
        self.child = Child.python_module("sf_bsread_writer.writer", replay, str(output_file), "-1", "0")
        ready = parse_ready(self.child.wait_for_line("READY ", timeout=DEADLINE))
        assert ready is not None
        self.url = ready["rest"] + "/"

    def get(self, path: str) -> dict:
        return requests.get(self.url + path, timeout=DEADLINE).json()

    def statistics(self) -> dict:
        return self.get("statistics")["statistics"]

    def wait_for_exit(self) -> int:
        return self.child.wait(timeout=DEADLINE)


@pytest.fixture
def stream() -> Iterator[tuple[Sender, Buffer]]:
    with source_stream() as sender:
        buffer = Buffer(sender)
        try:
            yield sender, buffer
        finally:
            buffer.child.stop()


@pytest.fixture
def processes() -> Iterator[list[Child]]:
    """Writers started by a test: stopped (by pid) whatever happens."""
    children: list[Child] = []
    try:
        yield children
    finally:
        for child in children:
            child.stop()


def start_writer(processes: list[Child], replay: str, output_file: Path) -> Writer:
    writer = Writer(replay, output_file)
    processes.append(writer.child)
    return writer


def test_buffer_writer_integration(stream, processes, tmp_path: Path) -> None:
    """test_integration.py: normal, slow and type-changing channels; start and stop by pulse id."""
    sender, buffer = stream
    for index in range(0, 10):
        sender.send(data={"normal_source": index, "slow_source": None, "changing_source": index})
    for index in range(10, 20):
        sender.send(data={"normal_source": index, "slow_source": index, "changing_source": [index] * 3})
    # 31, because the writer stops AFTER receiving the first message it should not write.
    for index in range(20, 31):
        sender.send(data={"normal_source": index, "slow_source": None, "changing_source": [index] * 3})
    buffer.wait_for_pulse(30)

    output_file = tmp_path / "ignore_integration.h5"
    writer = start_writer(processes, buffer.replay, output_file)
    assert writer.get("status") == {"state": "ok", "status": "waiting"}
    response = requests.post(writer.url + "parameters", json=PARAMETERS, timeout=DEADLINE).json()
    assert (response["state"], response["status"], response["parameters"]) == ("ok", "waiting", PARAMETERS)

    # Difference: the original answered the start with an empty body; here with the state.
    assert requests.put(writer.url + "start_pulse_id/0", timeout=DEADLINE).json()["state"] == "ok"
    response = writer.get("statistics")
    assert response["state"] == "ok"
    assert (response["statistics"]["start_pulse_id"], response["statistics"]["stop_pulse_id"]) == (0, None)
    requests.put(writer.url + "stop_pulse_id/29", timeout=DEADLINE)

    # The original: the writer is gone soon after its stop pulse, the buffer stays.
    assert writer.wait_for_exit() == 0  # complete
    assert buffer.child.process.poll() is None

    with h5py.File(output_file, "r") as file:
        normal_source = file["/data/normal_source/data"]
        slow_source = file["/data/slow_source/data"]
        changing_source_1 = file["/data/changing_source/data(1)"]
        changing_source_2 = file["/data/changing_source/data"]
        assert len(normal_source) == 30
        assert len(slow_source) == 30
        assert len(changing_source_1) == 10
        assert len(changing_source_2) == 30
        # The values the original wrote (test_writer_format.py: slow and changing sources).
        assert normal_source[:, 0].tolist() == list(range(30))
        assert slow_source[:, 0].tolist() == [0] * 10 + list(range(10, 20)) + [0] * 10
        assert changing_source_1[:, 0].tolist() == list(range(10))
        assert changing_source_2[:10].tolist() == [[0] * 3] * 10
        assert changing_source_2[10:].tolist() == [[index] * 3 for index in range(10, 30)]
        assert file["/data/changing_source/pulse_id"][()].tolist() == list(range(30))
        assert file["/data/slow_source/is_data_present"][()].tolist() == [0] * 10 + [1] * 10 + [0] * 10
        assert file["/general/user"][()] == b"p11057"
        assert file.attrs["outcome"] == "complete"


def test_classic_interaction(stream, processes, tmp_path: Path) -> None:
    """test_writer.py: parameters, a start in the future, a stop set while writing, a source without a clock."""
    sender, buffer = stream
    output_file = tmp_path / "ignore_bsread.h5"
    writer = start_writer(processes, buffer.replay, output_file)
    assert writer.get("status") == {"state": "ok", "status": "waiting"}
    assert writer.statistics()["last_pulse_id"] == -1  # the original's "nothing yet"

    answer = requests.post(writer.url + "parameters", json={}, timeout=DEADLINE)
    response = answer.json()
    assert response["state"] == "error"
    assert "Missing mandatory" in response["status"]
    assert answer.status_code == 400  # difference: the original answered 200

    response = requests.post(writer.url + "parameters", json=PARAMETERS, timeout=DEADLINE).json()
    assert (response["state"], response["status"], response["parameters"]) == ("ok", "waiting", PARAMETERS)

    requests.put(writer.url + "start_pulse_id/3", timeout=DEADLINE)
    response = writer.get("statistics")
    assert response["state"] == "ok"
    assert (response["statistics"]["start_pulse_id"], response["statistics"]["stop_pulse_id"]) == (3, None)

    data: dict = {"device1": 0, "device2": 0, "device3": None}
    for index in range(10):
        data["device1"] = index + 100
        data["device2"] = index + 200
        sender.send(timestamp=ZERO_CLOCK, pulse_id=index, data=data)
        if index == 6:  # somewhere before the end of the acquisition
            requests.put(writer.url + "stop_pulse_id/8", timeout=DEADLINE)
            response = writer.get("statistics")
            assert response["state"] == "ok"
            assert (response["statistics"]["start_pulse_id"], response["statistics"]["stop_pulse_id"]) == (3, 8)

    assert writer.wait_for_exit() == 0
    with h5py.File(output_file, "r") as file:
        assert file["data/device1/pulse_id"][()].tolist() == list(range(3, 9))
        assert file["data/device1/data"][:, 0].tolist() == list(range(103, 109))
        assert file["data/device2/data"][:, 0].tolist() == list(range(203, 209))
        assert not file["data/device3/is_data_present"][()].any()


EXIT_AFTER_LAST_MESSAGE = 0.5  # the original's test_writer.py: sleep(0.5), then assertFalse(writer.is_alive())


def test_the_writer_is_gone_half_a_second_after_the_last_message(stream, processes, tmp_path: Path) -> None:
    """test_writer.py: a DAQ system written for the original waits for the writer process to end.

    The range 3..8 is set before its last message is sent, the messages 0..9 go out, and the
    process must be gone 0.5 s after the last one: the file closed, the summary written, no
    grace spent answering ``/status`` (``--finished-grace`` is 0 unless a client asks for it).
    """
    sender, buffer = stream
    output_file = tmp_path / "gone.h5"
    writer = start_writer(processes, buffer.replay, output_file)
    requests.post(writer.url + "parameters", json=PARAMETERS, timeout=DEADLINE)
    requests.put(writer.url + "start_pulse_id/3", timeout=DEADLINE)
    requests.put(writer.url + "stop_pulse_id/8", timeout=DEADLINE)
    for pulse_id in range(10):
        sender.send(timestamp=ZERO_CLOCK, pulse_id=pulse_id, data={"device1": pulse_id + 100})
    last_sent = time.monotonic()
    assert writer.wait_for_exit() == 0
    gone_after = time.monotonic() - last_sent
    assert gone_after <= EXIT_AFTER_LAST_MESSAGE, f"the writer lingered {gone_after:.2f} s after the last message"
    with h5py.File(output_file, "r") as file:
        assert file["data/device1/pulse_id"][()].tolist() == list(range(3, 9))
    assert json.loads((tmp_path / "gone.h5.summary.json").read_text())["outcome"] == "complete"


@pytest.mark.parametrize("clock", ["source", "zero"])
def test_start_and_stop_now(stream, processes, tmp_path: Path, clock: str) -> None:
    """start_now/stop_now take the messages received in between, also from a source without a clock.

    The original buffer stamped messages with their receive time; here the
    source's timestamp counts where it is plausible (``clock=source``) and
    the buffer's receive time where it is not (``zero``), and the file says
    which (attribute ``time_base``).
    """
    sender, buffer = stream
    timestamp = ZERO_CLOCK if clock == "zero" else None  # None: the Sender stamps time.time()

    def send(pulse_ids: range) -> None:
        for pulse_id in pulse_ids:
            sender.send(timestamp=timestamp, pulse_id=pulse_id, data={"device1": pulse_id + 100})

    send(range(1, 6))  # before the start: not in the file
    buffer.wait_for_pulse(5)
    output_file = tmp_path / f"by_time_{clock}.h5"
    writer = start_writer(processes, buffer.replay, output_file)
    requests.post(writer.url + "parameters", json=PARAMETERS, timeout=DEADLINE)
    assert requests.put(writer.url + "start_now", timeout=DEADLINE).json()["status"] == "writing"
    send(range(6, 16))
    wait_for(lambda: writer.statistics()["messages_written"] == 10, timeout=DEADLINE, message="10 messages written")
    assert requests.put(writer.url + "stop_now", timeout=DEADLINE).json()["state"] == "ok"
    send(range(16, 19))  # after the stop: not in the file (and the first of them ends the range)
    assert writer.wait_for_exit() == 0
    with h5py.File(output_file, "r") as file:
        assert file["data/device1/pulse_id"][()].tolist() == list(range(6, 16))
        assert file.attrs["time_base"] == ("receive" if clock == "zero" else "source")
        assert file.attrs["outcome"] == "complete"
        # The channels' own timestamps stay the source's, whatever the time base.
        stamps = file["data/device1/timestamp"][()]
        assert (stamps == 0).all() if clock == "zero" else (stamps > 0).all()
        start, first = file.attrs["requested_start_time"], file.attrs["first_timestamp"]
        assert start <= first <= file.attrs["last_timestamp"] <= file.attrs["requested_stop_time"]


def test_persistent_mode(stream, processes, tmp_path: Path) -> None:
    """A start whose body names its output_file keeps the writer for the next start (the original's persistent mode)."""
    sender, buffer = stream
    writer = start_writer(processes, buffer.replay, tmp_path / "unused.h5")
    requests.post(writer.url + "parameters", json=PARAMETERS, timeout=DEADLINE)
    pulse_id = 0
    for run in (1, 2):
        output_file = tmp_path / f"run_{run}.h5"
        answer = requests.put(writer.url + "start_now", json={"output_file": str(output_file)}, timeout=DEADLINE)
        assert answer.json()["status"] == "writing"
        for _ in range(5):
            pulse_id += 1
            sender.send(pulse_id=pulse_id, data={"device1": pulse_id})
        wait_for(lambda: writer.statistics()["messages_written"] == 5, timeout=DEADLINE, message="5 messages")
        requests.put(writer.url + "stop_now", timeout=DEADLINE)
        pulse_id += 1
        sender.send(pulse_id=pulse_id, data={"device1": pulse_id})  # past the stop: ends the run
        # Difference: between runs the original answered "error" (its thread had ended); here "waiting".
        wait_for(lambda: writer.get("status")["status"] == "waiting", timeout=DEADLINE, message="back to waiting")
        statistics = writer.statistics()
        assert (statistics["runs_finished"], statistics["outcome"]) == (run, "complete")
        assert statistics["output_file"] == str(output_file)
        assert writer.child.process.poll() is None
        with h5py.File(output_file, "r") as file:
            assert file.attrs["complete"] == 1 and file.attrs["number_of_messages"] == 5
    assert requests.get(writer.url + "stop", timeout=DEADLINE).json() == {"state": "ok", "status": "finished"}
    assert writer.wait_for_exit() == 0  # the worst outcome of both runs
    assert not (tmp_path / "unused.h5").exists()
    summary = json.loads((tmp_path / "run_2.h5.summary.json").read_text())
    assert summary["outcome"] == "complete" and summary["runs_finished"] == 2
