"""Seeded, bounded fuzzing of a real buffer process through its ingest and replay ports.

Hostile and broken input of every kind the wire allows, mixed with good
messages: the buffer must stay up, its memory bounded, and nothing it
forwards (live output) or replays may be unparseable.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import h5py
import pytest
import requests
import zmq

from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.bsread.message import MessageParser
from sf_bsread_writer.bsread.spec import ProtocolError
from sf_bsread_writer.h5.file import H5File
from sf_bsread_writer.replay.client import ReplayClient
from tests.helpers import Child, wait_for

DEADLINE = 60.0
SEED = 20261130
N_MESSAGES = 600
MAX_MESSAGE_BYTES = 1_000_000

TYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _good(rng: random.Random, pulse_id: int) -> list[bytes]:
    channels, values = [], []
    for index in range(rng.randint(1, 6)):
        kind = rng.choice(["scalar", "array", "string"])
        name = f"C{index}"
        if kind == "string":
            channels.append({"name": name, "type": "string"})
            values.append("x" * rng.randint(0, 20))
        else:
            type_ = rng.choice(TYPES)
            shape = [1] if kind == "scalar" else [rng.randint(1, 64)]
            compression = rng.choice(["none", "none", "lz4", "bitshuffle_lz4"])
            channels.append({"name": name, "type": type_, "shape": shape, "compression": compression})
            values.append([1] * shape[0] if type_ != "bool" else [True] * shape[0])
    if rng.random() < 0.1:
        values[0] = None  # absent
    return build_message(pulse_id, channels, values, timestamp=1.7e9 + pulse_id / 100)


def _mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """One hostile change of a good message."""
    frames = list(frames)
    how = rng.randrange(12)
    if how == 0:  # random bytes in a random part
        index = rng.randrange(len(frames))
        frames[index] = rng.randbytes(rng.randint(0, 64))
    elif how == 1:  # drop or add a part
        if rng.random() < 0.5 and len(frames) > 1:
            del frames[rng.randrange(len(frames))]
        else:
            frames.insert(rng.randrange(len(frames) + 1), rng.randbytes(8))
    elif how == 2:  # deeply nested JSON main header
        frames[0] = b"[" * 5000 + b"]" * 5000
    elif how == 3:  # the main header with odd values
        header = json.loads(frames[0])
        header[rng.choice(["pulse_id", "global_timestamp", "hash", "htype", "dh_compression"])] = rng.choice(
            [None, -1, 2**64, 1.5, "x", [], {}, {"sec": -5, "ns": 2e9}, True])
        frames[0] = json.dumps(header).encode()
    elif how == 4:  # garbage data header under the message's (known) hash
        frames[1] = rng.randbytes(len(frames[1]))
    elif how == 5:  # a channel declaring an enormous shape
        header = json.loads(frames[1])
        header["channels"][0]["shape"] = [2**31, 2**31]
        frames[1] = json.dumps(header).encode()
    elif how == 6:  # truncated value parts
        for index in range(2, len(frames), 2):
            frames[index] = frames[index][: rng.randint(0, max(0, len(frames[index]) - 1))]
    elif how == 7:  # timestamp parts of the wrong size
        for index in range(3, len(frames), 2):
            frames[index] = rng.randbytes(rng.choice([1, 15, 17]))
    elif how == 8:  # oversize
        frames[2] = bytes(MAX_MESSAGE_BYTES + 1)
    elif how == 9:  # a control message
        frames = [json.dumps({"htype": "bsr_stop-1.0"}).encode()]
    elif how == 10:  # nothing at all in the main header
        frames[0] = b""
    else:  # non-UTF-8 JSON text
        frames[0] = b'{"htype": "bsr_m-1.1", "pulse_id": 1, "x": "\xff\xfe"}'
    return frames


def _pulse_ids(rng: random.Random, first: int, count: int) -> list[int]:
    """A stream's pulse ids with duplicates, small jumps, strays (0, 2^63 - 1) and one source restart."""
    ids, current = [], first
    for index in range(count):
        roll = rng.random()
        if roll < 0.02:
            ids.append(rng.choice([0, 2**63 - 1]))  # a stray: the stream goes on where it was
            continue
        if index == count // 2:
            current -= 1000  # the source restarts lower
        elif roll >= 0.05:  # else a duplicate
            current += rng.choice([1, 1, 1, 2])
        ids.append(current)
    return ids


def _hostile_replay_messages(rng: random.Random) -> list[list[bytes]]:
    messages = []
    for _ in range(200):
        how = rng.randrange(6)
        if how == 0:
            messages.append([rng.randbytes(rng.randint(0, 100))])
        elif how == 1:
            messages.append([json.dumps({"type": rng.choice(["request", "credit", "stop", "close", "x"]),
                                         rng.choice(["start_pulse_id", "received", "window", "stop_time"]):
                                         rng.choice([None, -1, 2**70, "1", 1.5, [], {}, 10**6])}).encode()])
        elif how == 2:
            messages.append([b"[" * 3000 + b"]" * 3000])
        elif how == 3:
            messages.append([b"{}"] * rng.randint(2, 5))
        elif how == 4:
            messages.append([json.dumps({"type": "request", "start_pulse_id": rng.randint(0, 10**6),
                                         "window": rng.randint(1, 4096)}).encode()])
        else:
            messages.append([json.dumps({"type": "credit", "received": rng.randint(0, 10**9)}).encode()])
    return messages


@pytest.mark.timeout(180)
def test_fuzzing_ingest_and_replay_leaves_the_buffer_up_bounded_and_forwarding_only_good_messages(tmp_path):
    rng = random.Random(SEED)
    context = zmq.Context()
    source = context.socket(zmq.PUSH)
    source.setsockopt(zmq.LINGER, 0)
    source.bind("tcp://127.0.0.1:0")
    viewer = context.socket(zmq.PULL)
    viewer.setsockopt(zmq.LINGER, 0)
    fuzzer = context.socket(zmq.DEALER)
    fuzzer.setsockopt(zmq.LINGER, 0)
    parser = MessageParser(MAX_MESSAGE_BYTES)
    forwarded = []
    try:
        with Child.python_module("sf_bsread_writer.buffer", source.getsockopt_string(zmq.LAST_ENDPOINT), "-o", "0",
                                 "--output-mode", "push", "--replay-port", "0", "--rest-port", "0", "-b", "200",
                                 "--buffer-bytes", "50000000", "--max-message-bytes", str(MAX_MESSAGE_BYTES),
                                 "--log-level", "ERROR") as child:
            endpoints = json.loads(child.wait_for_line("READY ").split("READY ", 1)[1])
            viewer.connect(endpoints["output"])
            fuzzer.connect(endpoints["replay"])
            probe = iter(range(1, 1000))

            def viewer_connected() -> bool:
                source.send_multipart(_good(rng, next(probe)))
                return viewer.poll(50)

            wait_for(viewer_connected, DEADLINE, interval=0, message="the viewer's connection")
            before = _rss_mb(child.process.pid)
            good = 0
            hostile_replay = _hostile_replay_messages(rng)
            for index, pulse_id in enumerate(_pulse_ids(rng, 10_000, N_MESSAGES)):
                frames = _good(rng, pulse_id)
                if rng.random() < 0.4:
                    frames = _mutate(rng, frames)
                else:
                    good += 1
                source.send_multipart(frames)
                if index % 3 == 0 and hostile_replay:
                    fuzzer.send_multipart(hostile_replay.pop())
                while viewer.poll(0):
                    forwarded.append(viewer.recv_multipart())
                while fuzzer.poll(0):
                    fuzzer.recv_multipart()  # answers, data: read so that nothing piles up here
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and viewer.poll(500):
                forwarded.append(viewer.recv_multipart())
            statistics = requests.get(endpoints["rest"] + "/statistics", timeout=5).json()["statistics"]
            grown = _rss_mb(child.process.pid) - before
            with ReplayClient(endpoints["replay"], start_pulse_id=0, context=context) as client:
                replayed = []
                while (event := client.receive(1.0)) is not None and len(replayed) < 200:
                    if hasattr(event, "frames"):
                        replayed.append(event.frames)
            assert child.process.poll() is None, "the buffer died:\n" + child.output()
    finally:
        for sock in (source, viewer, fuzzer):
            sock.close()
        context.term()
    # Nothing forwarded or replayed fails the checks the buffer makes (headers, part count, sizes); values
    # are checked where they are decoded: the writer stores an undecodable one as absent, and goes on.
    unparseable = []
    for frames in forwarded + replayed:
        try:
            parser.parse(frames)
        except ProtocolError as error:
            unparseable.append(error)
    assert not unparseable, unparseable[:3]
    path = tmp_path / "fuzzed.h5"
    with H5File(path) as h5:
        for frames in replayed:
            h5.append(parser.parse(frames))
    with h5py.File(path, "r") as file:
        assert file.attrs["complete"] == 1 and file.attrs["number_of_messages"] == len(replayed)
    assert len(forwarded) >= good // 2 and len(replayed) > 0 and statistics["rejected_total"] > 0
    assert grown < 100, f"buffer RSS grew by {grown:.0f} MB"
