"""The simulator: bsread's Sender with deterministic values, in-process and as the real command."""
from __future__ import annotations

import json
import signal
import threading
import time

import numpy as np
import pytest
import zmq

from sf_bsread_writer.bsread.message import MessageParser
from sf_bsread_writer.tools.simulate import (
    Simulator,
    channel_metadata,
    expected_values,
    parse_image_shape,
)
from tests.helpers import Child

DEADLINE = 30.0


def _receive(simulator: Simulator, count: int) -> list:
    """Run the simulator for ``count`` messages and parse what a PULL socket gets."""
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.connect(simulator.address)
    thread = threading.Thread(target=simulator.run, args=(count,), daemon=True)
    thread.start()
    parser = MessageParser()
    try:
        messages = []
        for _ in range(count):
            assert pull.poll(DEADLINE * 1000), "no message from the simulator"
            messages.append(parser.parse(pull.recv_multipart(copy=False)))
        return messages
    finally:
        simulator.stop()
        thread.join(DEADLINE)
        simulator.close(linger=0)
        pull.close()
        context.term()


def _assert_values(profile: str, message, **shape) -> None:
    expected = expected_values(profile, message.pulse_id, **shape)
    assert list(message.data_header.names) == list(expected)
    for index, spec in enumerate(message.data_header.channels):
        value, want = message.value(index), expected[spec.name]
        if want is None:
            assert value is None and not message.is_present(index), spec.name
        elif isinstance(want, str):
            assert value == want
        else:
            assert value.dtype == want.dtype and value.shape == want.shape, spec.name
            assert np.array_equal(value, want), spec.name


@pytest.mark.parametrize("profile, compression", [
    ("mixed", "none"), ("mixed", "bitshuffle_lz4"), ("mixed", "lz4"),
    ("camera", "bitshuffle_lz4"), ("camera", "none"), ("scalars", "none"), ("demo", "none"),
])
def test_profiles_send_their_expected_values(profile, compression):
    shape = {"n_channels": 7, "image_shape": (64, 48)}
    simulator = Simulator(profile, compression=compression, start_pulse_id=95, **shape)
    simulator.open()
    messages = _receive(simulator, 12)
    assert [m.pulse_id for m in messages] == list(range(95, 107))
    assert len({m.main.hash for m in messages}) == 1  # declared channels: the header never flips
    for message in messages:
        _assert_values(profile, message, **shape)
    specs = {spec.name: spec for spec in messages[0].data_header.channels}
    for entry in channel_metadata(profile, compression, **shape):
        assert specs[entry["name"]].compression == entry["compression"]
        assert list(specs[entry["name"]].shape) == entry["shape"]


def test_mixed_profile_covers_every_type_and_an_absent_channel():
    types = {entry["type"] for entry in channel_metadata("mixed")}
    assert types == {"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                     "float32", "float64", "string"}
    assert any(entry["encoding"] == "big" for entry in channel_metadata("mixed"))
    assert expected_values("mixed", 10)["MIXED:SLOW"] is not None
    assert expected_values("mixed", 11)["MIXED:SLOW"] is None


def test_pulse_id_step_and_time_derived_start():
    simulator = Simulator("scalars", n_channels=2, start_pulse_id=1_000, pulse_id_step=10)
    simulator.open()
    assert [m.pulse_id for m in _receive(simulator, 3)] == [1_000, 1_010, 1_020]
    assert abs(Simulator("scalars", start_pulse_id=0).next_pulse_id - time.time() * 100) < 1_000


def test_bad_arguments():
    with pytest.raises(ValueError):
        parse_image_shape("12by3")
    with pytest.raises(ValueError):
        Simulator("nonsense")
    assert parse_image_shape("640x480") == (640, 480)


def test_cli_count_then_exit():
    with Child.python_module("sf_bsread_writer.tools.simulate", "--profile", "scalars", "--n-channels", "3",
                             "--port", "0", "--rate", "0", "--count", "5", "--start-pulse-id", "42") as child:
        ready = json.loads(child.wait_for_line("READY ").split("READY ", 1)[1])
        assert ready["address"].startswith("tcp://127.0.0.1:")
        context = zmq.Context()
        pull = context.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.connect(ready["address"])
        try:
            pulse_ids = []
            for _ in range(5):
                assert pull.poll(DEADLINE * 1000)
                pulse_ids.append(json.loads(pull.recv_multipart()[0])["pulse_id"])
        finally:
            pull.close()
            context.term()
        assert pulse_ids == [42, 43, 44, 45, 46]
        assert child.wait(DEADLINE) == 0
    assert "Traceback" not in child.output()


def test_cli_sigterm_exits_cleanly():
    with Child.python_module("sf_bsread_writer.tools.simulate", "--profile", "mixed", "--port", "0",
                             "--rate", "100") as child:
        child.wait_for_line("READY ")  # no consumer: the sender waits for one, SIGTERM must still work
        child.signal(signal.SIGTERM)
        assert child.wait(DEADLINE) == 0
    assert "Traceback" not in child.output()
