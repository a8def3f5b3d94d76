"""The buffer service end to end: real ZeroMQ sockets, bsread's Sender as source, bsread's Source as consumer.

Every test starts its buffer in-process (``Buffer.run`` in a thread, port 0
everywhere) except the CLI tests, which launch the real command. No sleeps:
conditions are polled with ``wait_for`` against generous deadlines.
"""
from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import zmq
from bsread import SUB, Source

from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.buffer.service import Buffer
from sf_bsread_writer.buffer.settings import BufferSettings
from sf_bsread_writer.replay.client import ReplayClient
from sf_bsread_writer.replay.messages import Data, End, Gap
from sf_bsread_writer.status import prometheus_text
from sf_bsread_writer.tools.simulate import Simulator, expected_values
from tests.helpers import Child, free_port, wait_for

DEADLINE = 30.0


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def running_buffer(stream: str, **kwargs) -> Iterator[Buffer]:
    """A Buffer running in a thread on free ports; always stopped and joined."""
    kwargs.setdefault("heartbeat_interval", 0.2)
    clocks = {name: kwargs.pop(name) for name in ("clock", "wall_clock") if name in kwargs}
    buffer = Buffer(BufferSettings(stream, output_port=0, replay_port=0, rest_port=0, **kwargs), **clocks)
    thread = threading.Thread(target=buffer.run, name="buffer", daemon=True)
    thread.start()
    try:
        assert buffer.started.wait(DEADLINE)
        assert not buffer.stopped.is_set(), "buffer failed to start"
        yield buffer
    finally:
        buffer.stop()
        thread.join(DEADLINE)
        assert not thread.is_alive()


@contextlib.contextmanager
def push_source() -> Iterator[tuple[zmq.Socket, str]]:
    """The test's bsread source: a PUSH socket on a free loopback port, and its address; always closed."""
    context = zmq.Context()
    source = context.socket(zmq.PUSH)
    source.setsockopt(zmq.LINGER, 0)
    source.bind("tcp://127.0.0.1:0")
    try:
        yield source, source.getsockopt_string(zmq.LAST_ENDPOINT)
    finally:
        source.close()
        context.term()


@contextlib.contextmanager
def sending(simulator: Simulator, count: int = 0) -> Iterator[threading.Thread]:
    """Run ``simulator.run(count)`` in a thread; stop and close it at the end."""
    thread = threading.Thread(target=simulator.run, args=(count,), name="simulator", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        simulator.stop()
        thread.join(DEADLINE)
        simulator.close()  # lingers up to 1 s so that what was sent reaches the buffer
        assert not thread.is_alive()


class Tee:
    """Sits between a source and the buffer and records every message byte for byte, by pulse id."""

    def __init__(self, source: str) -> None:
        self.context = zmq.Context()
        self.pull = self.context.socket(zmq.PULL)
        self.pull.connect(source)
        self.push = self.context.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.bind("tcp://127.0.0.1:0")
        self.address = self.push.getsockopt_string(zmq.LAST_ENDPOINT)
        self.messages: dict[int, list[bytes]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tee", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.pull.poll(100):
                continue
            frames = self.pull.recv_multipart()
            self.messages[json.loads(frames[0])["pulse_id"]] = frames
            self.push.send_multipart(frames)  # the buffer is connected: cannot block for long

    def __enter__(self) -> "Tee":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(DEADLINE)
        self.pull.close(linger=0)
        self.push.close(linger=0)
        self.context.term()


def received(buffer: Buffer, n: int) -> dict:
    return wait_for(lambda: (s := buffer.statistics()).received >= n and s, DEADLINE,
                    message=f"{n} messages received")


def replay_all(address: str, start_pulse_id: int, stop_pulse_id: int, window: int = 32,
               expect_gaps: bool = False) -> tuple[list[Data], list[Gap]]:
    """Replay a range to its End; returns the data and the gap notices."""
    data: list[Data] = []
    gaps: list[Gap] = []
    with ReplayClient(address, start_pulse_id=start_pulse_id, stop_pulse_id=stop_pulse_id, window=window,
                      heartbeat_interval=0.2) as client:
        deadline = time.monotonic() + DEADLINE
        while True:
            assert time.monotonic() < deadline, "replay did not end"
            event = client.receive(1.0)
            if isinstance(event, Data):
                data.append(event)
            elif isinstance(event, Gap):
                gaps.append(event)
            elif isinstance(event, End):
                break
            elif event is not None:
                raise AssertionError(f"unexpected {event}")
    if not expect_gaps:
        assert gaps == []
    return data, gaps


def as_bytes(frames) -> list[bytes]:
    return [bytes(frame) for frame in frames]


# ---------------------------------------------------------------------------
# data integrity
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["bitshuffle_lz4", "lz4"])
def test_live_output_and_replay_byte_for_byte(compression):
    """What a consumer and a writer get is what the source sent: every frame, hash and compressed part."""
    n = 60
    simulator = Simulator("mixed", compression=compression, start_pulse_id=10_000, rate=500)
    # The ring holds more than the simulator can send: nothing is evicted however slow the viewer joins.
    with Tee(simulator.open()) as tee, running_buffer(tee.address, buffer_length=20_000) as buffer:
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(buffer.output_address)
        try:
            # PUB drops what is sent before the subscription arrives: send until the viewer sees something.
            with sending(simulator, 10_000):
                live = {}
                def _got_n():
                    # Stop reading once n are in: at 500 Hz a message is always due within 10 ms, so "until
                    # the socket is quiet" would read until the buffer happens to fall behind (seconds).
                    while len(live) < n and sub.poll(10):
                        frames = sub.recv_multipart()
                        live[json.loads(frames[0])["pulse_id"]] = frames
                    return len(live) >= n
                wait_for(_got_n, DEADLINE, message="live messages")
            for pulse_id, frames in live.items():
                assert frames == tee.messages[pulse_id]
        finally:
            sub.close()
        first = min(tee.messages)
        data, _ = replay_all(buffer.replay_address, first, first + n - 1)
        assert [d.pulse_id for d in data] == list(range(first, first + n))
        for event in data:
            assert as_bytes(event.frames) == tee.messages[event.pulse_id]


def test_bsread_source_decodes_live_output():
    """bsread's own receiver reads the buffer's PUB output and finds the exact values of every pulse."""
    simulator = Simulator("mixed", compression="bitshuffle_lz4", start_pulse_id=20_000, rate=500)
    with running_buffer(simulator.open()) as buffer, sending(simulator):
        host, port = buffer.output_address.rsplit("//", 1)[1].rsplit(":", 1)
        source = Source(host=host, port=int(port), mode=SUB, receive_timeout=1000).connect()
        try:
            seen = []
            def _receive():
                message = source.receive()
                if message is not None and message.data.data:
                    seen.append(message.data)
                return len(seen) >= 20
            wait_for(_receive, DEADLINE, interval=0, message="20 messages decoded by bsread")
        finally:
            source.disconnect()
    for data in seen:
        expected = expected_values("mixed", data.pulse_id)
        for name, value in expected.items():
            got = data.data[name].value
            if value is None:
                assert got is None, name
            elif isinstance(value, str):
                assert got == value
            else:  # bsread returns 1-element arrays as scalars
                assert np.array_equal(np.asarray(got).reshape(value.shape), value), name


# ---------------------------------------------------------------------------
# replay
# ---------------------------------------------------------------------------
def test_replay_from_past_pulse_and_two_clients_at_once():
    n = 200
    simulator = Simulator("scalars", n_channels=20, start_pulse_id=5_000)
    with running_buffer(simulator.open(), buffer_length=1000) as buffer:
        with sending(simulator, n) as thread:
            thread.join(DEADLINE)
        received(buffer, n)
        # a range entirely in the past, from the middle of the ring
        data, _ = replay_all(buffer.replay_address, 5_050, 5_099)
        assert [d.pulse_id for d in data] == list(range(5_050, 5_100))
        # two writers at once, each its own cursor, each gets everything (backlog, then live)
        simulator2 = Simulator("scalars", n_channels=20, start_pulse_id=5_000 + n, rate=400)
        simulator2.port = int(simulator.address.rsplit(":", 1)[1])
        results: dict[str, list] = {}

        def _client(tag: str, start: int) -> None:
            results[tag] = replay_all(buffer.replay_address, start, 5_000 + 2 * n - 1, window=16)[0]

        clients = [threading.Thread(target=_client, args=("a", 5_000)),
                   threading.Thread(target=_client, args=("b", 5_100))]
        for client in clients:
            client.start()
        simulator2.open()
        with sending(simulator2, n):
            for client in clients:
                client.join(DEADLINE * 2)
                assert not client.is_alive()
    assert [d.pulse_id for d in results["a"]] == list(range(5_000, 5_000 + 2 * n))
    assert [d.pulse_id for d in results["b"]] == list(range(5_100, 5_000 + 2 * n))


def test_slow_client_gets_gap_while_others_are_unaffected():
    n = 250
    # 100 Hz with a ring of 100: the fast writer may lag up to a second (loaded CI machine) without loss.
    simulator = Simulator("scalars", n_channels=10, start_pulse_id=1_000, rate=100)
    with running_buffer(simulator.open(), buffer_length=100) as buffer:
        fast_result: list = []
        fast = threading.Thread(target=lambda: fast_result.extend(
            replay_all(buffer.replay_address, 1_000, 1_000 + n - 1, window=64)[0]))
        slow = ReplayClient(buffer.replay_address, start_pulse_id=1_000, stop_pulse_id=1_000 + n - 1, window=4,
                            heartbeat_interval=0.2)
        slow.start()
        fast.start()
        try:
            with sending(simulator, n) as thread:
                thread.join(DEADLINE)
            received(buffer, n)  # the slow client has not read anything yet: the ring (100) overtook it
            fast.join(DEADLINE)
            assert not fast.is_alive()
            slow_data, slow_gaps = [], []
            while True:
                event = slow.receive(DEADLINE)
                assert event is not None
                if isinstance(event, End):
                    break
                (slow_data if isinstance(event, Data) else slow_gaps).append(event)
        finally:
            slow.close()
            fast.join(DEADLINE)
        statistics = wait_for(lambda: (s := buffer.statistics()).replay.ended == 2 and s, DEADLINE)
    assert [d.pulse_id for d in fast_result] == list(range(1_000, 1_000 + n))
    assert len(slow_gaps) == 1 and slow_gaps[0].reason == "evicted"
    gap = slow_gaps[0]
    # nothing silent: what arrived plus what was reported lost is everything
    assert len(slow_data) + gap.count == n
    assert gap.first_pulse_id == slow_data[gap.first_pulse_id - 1_000 - 1].pulse_id + 1
    assert slow_data[gap.first_pulse_id - 1_000].pulse_id == gap.last_pulse_id + 1
    assert statistics.replay.gaps >= 1 and statistics.replay.lost == gap.count


# ---------------------------------------------------------------------------
# ring bounds, bad input, source restarts
# ---------------------------------------------------------------------------
def test_eviction_by_count_and_by_bytes_in_statistics():
    simulator = Simulator("scalars", n_channels=10, start_pulse_id=1_000)
    address = simulator.open()
    with running_buffer(address, buffer_length=20) as by_count, sending(simulator, 50):
        statistics = wait_for(lambda: (s := by_count.statistics()).received >= 50 and s, DEADLINE)
        message_bytes = statistics.received_bytes // 50  # about: timestamps vary in length
        ring = statistics.ring
        assert ring.messages == 20 and ring.evicted == 30
        assert ring.oldest_pulse_id == 1_030 and ring.newest_pulse_id == 1_049
        assert ring.bytes + ring.evicted_bytes == statistics.received_bytes
    simulator = Simulator("scalars", n_channels=10, start_pulse_id=1_000)
    limit = 7 * message_bytes + message_bytes // 2
    with running_buffer(simulator.open(), buffer_length=1000, buffer_bytes=limit) as by_bytes, \
            sending(simulator, 50):
        ring = wait_for(lambda: (s := by_bytes.statistics()).received >= 50 and s, DEADLINE).ring
        assert ring.messages == 7 and ring.bytes <= limit and ring.evicted == 43
        assert ring.max_bytes == limit and ring.newest_pulse_id == 1_049


def _bad_messages() -> dict[str, list[bytes]]:
    good = build_message(1, [{"name": "X", "type": "int32"}], [1])
    header = json.loads(good[0])

    def main(**changes) -> bytes:
        return json.dumps({**header, **changes}).encode()

    bad_header = b"not json at all"
    return {
        "main_header_not_json": [b"{not json", *good[1:]],
        "bad_pulse_id": [main(pulse_id=-5), *good[1:]],
        "part_count": [good[0], good[1], good[2]],
        "unknown_compression": [main(hash="c" * 32, dh_compression="zip"), *good[1:]],
        "data_header_invalid": [main(hash="d" * 32), bad_header, b"", b""],
        "oversize": [good[0], good[1], b"\x00" * 300_000, good[3]],
    }


def test_bad_input_is_counted_by_reason_and_dropped_while_good_flows():
    context = zmq.Context()
    source = context.socket(zmq.PUSH)
    source.setsockopt(zmq.LINGER, 0)
    source.bind("tcp://127.0.0.1:0")
    viewer = context.socket(zmq.PULL)
    viewer.setsockopt(zmq.LINGER, 0)
    channels = [{"name": "X", "type": "int32"}]
    try:
        with running_buffer(source.getsockopt_string(zmq.LAST_ENDPOINT), output_mode="push",
                            max_message_bytes=200_000) as buffer:
            viewer.connect(buffer.output_address)
            # PUSH drops (and counts) while the viewer's connection is not up yet: probe until it is.
            probes = iter(range(1, 100))

            def _probe() -> bool:
                probe = next(probes)
                source.send_multipart(build_message(probe, channels, [probe]))
                return viewer.poll(50)

            wait_for(_probe, DEADLINE, interval=0, message="the viewer's connection")
            n_probes = next(probes) - 1
            base = wait_for(lambda: (s := buffer.statistics()).received == n_probes and s, DEADLINE)
            bad = _bad_messages()
            pulse_id = 100
            for frames in bad.values():
                source.send_multipart(build_message(pulse_id, channels, [pulse_id]))
                source.send_multipart(frames)
                pulse_id += 1
            source.send_multipart([json.dumps({"htype": "bsr_stop-1.0"}).encode()])  # control message
            source.send_multipart(build_message(pulse_id, channels, [pulse_id]))
            statistics = wait_for(lambda: (s := buffer.statistics()).received == n_probes + len(bad) + 1
                                  and s.ignored == 1 and s, DEADLINE, message="all messages handled")
            # the live output saw exactly the good messages, in order
            live = []

            def _live() -> bool:
                if viewer.poll(100):
                    frames = viewer.recv_multipart()
                    if json.loads(frames[0])["pulse_id"] >= 100:
                        live.append(frames)
                return len(live) == len(bad) + 1

            wait_for(_live, DEADLINE, message="live messages")
            data, _ = replay_all(buffer.replay_address, 100, pulse_id)
    finally:
        source.close()
        viewer.close()
        context.term()
    assert statistics.rejected == {reason: 1 for reason in bad}
    assert statistics.rejected_total == len(bad) and statistics.ignored == 1
    assert statistics.received - base.received == len(bad) + 1
    assert statistics.forwarded - base.forwarded == len(bad) + 1
    assert [json.loads(frames[0])["pulse_id"] for frames in live] == list(range(100, pulse_id + 1))
    assert [d.pulse_id for d in data] == list(range(100, pulse_id + 1))


def test_a_data_header_is_checked_by_its_bytes_not_its_hash_and_by_its_declared_sizes():
    """Garbage under a known hash (was stored and forwarded): rejected, never forwarded. A 2^62-byte channel:
    that channel refused and counted (was: the whole message rejected), the message and its other channels kept."""
    context = zmq.Context()
    source = context.socket(zmq.PUSH)
    source.setsockopt(zmq.LINGER, 0)
    source.bind("tcp://127.0.0.1:0")
    channels = [{"name": "X", "type": "int32"}]
    huge = [{"name": "H", "type": "uint8", "shape": [2**31, 2**31]}, {"name": "X", "type": "int32"}]
    try:
        with running_buffer(source.getsockopt_string(zmq.LAST_ENDPOINT)) as buffer:
            good = build_message(1, channels, [1])
            source.send_multipart(good)
            garbage = build_message(2, channels, [2])
            garbage[1] = b"\xff" * len(garbage[1])  # the data header of pulse 1's hash, but not its bytes
            source.send_multipart(garbage)
            source.send_multipart(build_message(3, huge, [None, 3]))  # 450 bytes declaring 2^62 per value
            source.send_multipart(build_message(4, channels, [4]))
            statistics = wait_for(lambda: (s := buffer.statistics()).rejected_total == 1 and s.received == 3
                                  and s, DEADLINE, message="all four handled")
            data, _ = replay_all(buffer.replay_address, 1, 4)
    finally:
        source.close()
        context.term()
    assert statistics.rejected == {"data_header_invalid": 1}
    assert statistics.refused_channel_values == {"data_header_invalid": 1}
    assert [d.pulse_id for d in data] == [1, 3, 4]
    assert statistics.forwarded == 3


def test_source_restart_with_pulse_id_reset():
    first = Simulator("scalars", n_channels=5, start_pulse_id=9_000, rate=1000)
    address = first.open()
    port = int(address.rsplit(":", 1)[1])
    with running_buffer(address) as buffer:
        client = ReplayClient(buffer.replay_address, start_pulse_id=9_000, window=64, heartbeat_interval=0.2)
        client.start()
        try:
            with sending(first, 30) as thread:
                thread.join(DEADLINE)
            received(buffer, 30)
            # the source goes away and comes back on the same address, counting from 100
            second = Simulator("scalars", n_channels=5, port=port, start_pulse_id=100, rate=1000)
            second.open()
            with sending(second, 30) as thread:
                thread.join(DEADLINE)
            statistics = received(buffer, 60)
            events = []
            while len([e for e in events if isinstance(e, Data)]) < 60:
                event = client.receive(DEADLINE)
                assert event is not None
                events.append(event)
        finally:
            client.close()
    assert statistics.pulse_ids.resets == 1
    assert statistics.ring.oldest_pulse_id == 100 and statistics.ring.newest_pulse_id == 129
    assert statistics.source.idle_seconds is not None
    pulse_ids = [e.pulse_id if isinstance(e, Data) else e for e in events]
    assert pulse_ids == [*range(9_000, 9_030), Gap(None, None, "source_reset", 0), *range(100, 130)]


def test_one_stray_pulse_id_does_not_evict_the_ring():
    """A glitched pulse_id (0 in a stream at 5e9) is held back, then dropped as out of order."""
    context = zmq.Context()
    source = context.socket(zmq.PUSH)
    source.setsockopt(zmq.LINGER, 0)
    source.bind("tcp://127.0.0.1:0")
    channels = [{"name": "X", "type": "int64"}]
    try:
        with running_buffer(source.getsockopt_string(zmq.LAST_ENDPOINT)) as buffer:
            for pulse_id in [*range(5_000_000_000, 5_000_000_020), 0, *range(5_000_000_020, 5_000_000_030)]:
                source.send_multipart(build_message(pulse_id, channels, [pulse_id]))
            statistics = wait_for(lambda: (s := buffer.statistics()).ring.newest_pulse_id == 5_000_000_029
                                  and s, DEADLINE, message="the stream after the stray message")
            data, _ = replay_all(buffer.replay_address, 5_000_000_000, 5_000_000_029)
            pulse_ids = [d.pulse_id for d in data]
    finally:
        source.close()
        context.term()
    assert pulse_ids == list(range(5_000_000_000, 5_000_000_030))  # nothing evicted, nothing missing
    assert statistics.ring.messages == 30
    assert statistics.pulse_ids.resets == 0
    assert (statistics.pulse_ids.held_back, statistics.pulse_ids.out_of_order) == (1, 1)


# ---------------------------------------------------------------------------
# socket modes
# ---------------------------------------------------------------------------
def test_push_output_counts_drops_without_consumer_then_delivers():
    simulator = Simulator("scalars", n_channels=3, start_pulse_id=1)
    with running_buffer(simulator.open(), output_mode="push") as buffer:
        with sending(simulator, 10) as thread:
            thread.join(DEADLINE)
        received(buffer, 10)
        assert buffer.statistics().output_drops == 10  # nobody connected: dropped, counted, not blocked
        pull = zmq.Context.instance().socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.connect(buffer.output_address)
        try:
            simulator2 = Simulator("scalars", n_channels=3, start_pulse_id=11, rate=200,
                                   port=int(simulator.address.rsplit(":", 1)[1]))
            simulator2.open()
            got = []
            with sending(simulator2):
                wait_for(lambda: (pull.poll(100) and got.append(pull.recv_multipart())) or len(got) >= 20,
                         DEADLINE)
        finally:
            pull.close()
    pulse_ids = [json.loads(frames[0])["pulse_id"] for frames in got]
    assert pulse_ids == sorted(pulse_ids) and len(set(pulse_ids)) == len(pulse_ids)


def test_sub_source_mode():
    simulator = Simulator("mixed", mode="pub", start_pulse_id=1, rate=200)
    with running_buffer(simulator.open(), source_mode="sub") as buffer, sending(simulator):
        statistics = received(buffer, 20)
    assert statistics.rejected_total == 0 and statistics.source.mode == "sub"


# ---------------------------------------------------------------------------
# HTTP and the real command
# ---------------------------------------------------------------------------
def test_http_status_statistics_metrics_and_404():
    simulator = Simulator("scalars", n_channels=3, start_pulse_id=1_000)
    with running_buffer(simulator.open(), name="HTTPTEST") as buffer:
        with sending(simulator, 20) as thread:
            thread.join(DEADLINE)
        received(buffer, 20)
        client = ReplayClient(buffer.replay_address, start_pulse_id=1_000, window=4).start()
        try:
            wait_for(lambda: client.receive(0.1) is not None, DEADLINE)
            # the HTTP thread answers from the latest published snapshot
            statistics = wait_for(lambda: (s := requests.get(buffer.rest_url + "/statistics", timeout=5).json())
                                  ["statistics"]["replay"]["active_sessions"] == 1 and s, DEADLINE)
            status = requests.get(buffer.rest_url + "/status", timeout=5)
            metrics = requests.get(buffer.rest_url + "/metrics", timeout=5)
            missing = requests.get(buffer.rest_url + "/nope", timeout=5)
            wrong_method = requests.post(buffer.rest_url + "/status", timeout=5)
        finally:
            client.close()
    assert status.status_code == 200
    assert status.json()["state"] == "ok" and status.json()["status"] == "receiving"
    assert status.json()["name"] == "HTTPTEST" and status.json()["newest_pulse_id"] == 1_019
    assert statistics["state"] == "ok"
    body = statistics["statistics"]
    assert body["received"] == 20 and body["ring"]["messages"] == 20 and body["ring"]["oldest_pulse_id"] == 1_000
    session = body["replay"]["sessions"][0]
    assert session["start_pulse_id"] == 1_000 and session["sent"] >= 1 and session["window"] == 4
    assert body["rates"]["messages_per_second"] >= 0 and body["source"]["idle_seconds"] >= 0
    assert metrics.status_code == 200 and metrics.headers["Content-Type"].startswith("text/plain")
    assert 'sf_bsread_buffer_received_messages_total{buffer="HTTPTEST"} 20' in metrics.text
    assert 'sf_bsread_buffer_newest_pulse_id{buffer="HTTPTEST"} 1019' in metrics.text
    assert missing.status_code == 404 and missing.json()["state"] == "error"
    assert wrong_method.status_code == 405 and wrong_method.json()["state"] == "error"


def test_cli_ready_line_systemd_notify_and_sigterm(tmp_path):
    """The real command: settings from the environment, READY line, sd_notify, clean SIGTERM."""
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(DEADLINE)
    env = {"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000",
           "SF_BSREAD_BUFFER_NAME": "CLITEST", "SF_BSREAD_BUFFER_REST_PORT": "0"}
    try:
        with Child.python_module("sf_bsread_writer.buffer", f"tcp://127.0.0.1:{free_port()}", "-o", "0",
                                 "--replay-port", "0", "-b", "50", env=env) as child:
            endpoints = json.loads(child.wait_for_line("READY ").split("READY ", 1)[1])
            assert set(endpoints) >= {"output", "replay", "rest"}
            assert endpoints["output"].startswith("tcp://127.0.0.1:")
            states: set[str] = set()
            while not (any(s.startswith("READY=1") for s in states) and "WATCHDOG=1" in states
                       and any(s.startswith("STATUS=waiting_for_source: 0.0 msg/s") for s in states)):
                states.add(notify.recv(4096).decode())  # times out (DEADLINE) if one never comes
            status = requests.get(endpoints["rest"] + "/status", timeout=5).json()
            assert status["name"] == "CLITEST" and status["status"] == "waiting_for_source"
            child.signal(signal.SIGTERM)
            assert child.wait(DEADLINE) == 0
            output = child.output()
    finally:
        notify.close()
    assert "Traceback" not in output
    assert "stopped" in output


def test_cli_rejects_bad_options():
    with Child.python_module("sf_bsread_writer.buffer", "tcp://127.0.0.1:1", "--output-mode", "fan") as child:
        assert child.wait(DEADLINE) == 2
        assert "invalid choice" in child.output()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_writers_that_never_read_cannot_grow_the_buffer():
    """20 replay sessions that never grant credit nor read: at most --max-writers, each --replay-inflight-bytes.

    Before: RSS 45 -> 1525 MB in 28 s and rising (every message of the stream queued per writer).
    """
    simulator = Simulator("mixed", start_pulse_id=1_000, rate=100)  # 0.85 MB a message, parts below 1 MiB
    address = simulator.open()
    context = zmq.Context()
    dealers = []
    try:
        with sending(simulator, 0), \
                Child.python_module("sf_bsread_writer.buffer", address, "-o", "0", "--replay-port", "0",
                                    "--rest-port", "0", "-b", "40", "--max-writers", "8",
                                    "--replay-inflight-bytes", "4000000") as child:
            endpoints = json.loads(child.wait_for_line("READY ").split("READY ", 1)[1])
            rest = endpoints["rest"]

            def received() -> int:
                return requests.get(rest + "/statistics", timeout=5).json()["statistics"]["received"]

            wait_for(lambda: received() >= 40, DEADLINE, message="the ring full")
            before = _rss_mb(child.process.pid)
            for _ in range(20):
                dealer = context.socket(zmq.DEALER)
                dealer.setsockopt(zmq.LINGER, 0)
                dealer.setsockopt(zmq.RCVHWM, 1)  # and never recv: its socket stops reading
                dealer.connect(endpoints["replay"])
                dealer.send(json.dumps({"type": "request", "start_pulse_id": 0, "window": 4096}).encode())
                dealers.append(dealer)
            mark = received()
            wait_for(lambda: received() >= mark + 100, DEADLINE, message="1 s of stream meanwhile")
            grown = _rss_mb(child.process.pid) - before
            replay = requests.get(rest + "/statistics", timeout=5).json()["statistics"]["replay"]
    finally:
        for dealer in dealers:
            dealer.close()
        context.term()
    assert replay["started"] == 8 and replay["refused"] == 12  # (a loaded machine may expire some by now)
    assert all(session["in_flight_bytes"] <= 4_000_000 + 900_000 for session in replay["sessions"])
    # 8 writers x 4 MB in flight, plus zmq's copies of them: far below the 20 x 3 s x 85 MB/s before.
    print(f"buffer RSS {before:.0f} MB, grew by {grown:.0f} MB with 20 writers that never read")
    assert grown < 150, f"buffer RSS grew by {grown:.0f} MB"


def test_a_source_part_over_twice_the_limit_is_refused_and_the_buffer_connects_again():
    """libzmq refuses a part over MAXMSGSIZE at its header and drops the connection for good (a protocol error
    is never reconnected, unlike a source that went away): without a new connection the buffer never heard
    from its source again. The next messages arrive, and the connection made anew is counted."""
    limit = 10_000
    channels = [{"name": "X", "type": "int32"}]
    with push_source() as (source, address), running_buffer(address, max_message_bytes=limit) as buffer:
        source.setsockopt(zmq.SNDTIMEO, int(DEADLINE * 1000))
        source.send_multipart(build_message(1, channels, [1]))
        wait_for(lambda: buffer.statistics().received == 1, DEADLINE, message="pulse 1")
        source.send_multipart(build_message(2, channels, [2])[:1] + [b"\0" * (3 * limit)])
        pulse_id = iter(range(3, 10**6))

        def sent_and_received():  # what was queued for the dropped connection went with it
            try:
                source.send_multipart(build_message(next(pulse_id), channels, [0]), zmq.NOBLOCK)
            except zmq.Again:
                pass  # not connected again yet
            return buffer.statistics().received >= 2

        wait_for(sent_and_received, DEADLINE, interval=0.05, message="a message after the refused part")
        assert buffer.ingest_reconnects == 1
        # What operators see: /statistics (source.reconnects) and /metrics, from the next snapshot on.
        wait_for(lambda: buffer.statistics().source.reconnects == 1, DEADLINE, message="source.reconnects")
        assert 'sf_bsread_buffer_source_reconnects_total{buffer="' in prometheus_text(buffer.statistics())
        assert f'source_reconnects_total{{buffer="{buffer.name}"}} 1' in prometheus_text(buffer.statistics())


def test_a_source_announcing_a_huge_part_is_disconnected_before_it_costs_memory():
    """A raw ZMTP peer announces a 2 GiB part and streams: libzmq drops it at the header (ZMQ_MAXMSGSIZE).

    Before: the buffer took the bytes as they came (+500 MB before any check of the message).
    """
    from benchmarks.common import zmtp_handshake

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(DEADLINE)
    port = server.getsockname()[1]
    sent = 0
    try:
        with Child.python_module("sf_bsread_writer.buffer", f"tcp://127.0.0.1:{port}", "-o", "0",
                                 "--replay-port", "0", "--rest-port", "0", "-b", "10",
                                 "--max-message-bytes", "1000000") as child:
            endpoints = json.loads(child.wait_for_line("READY ").split("READY ", 1)[1])
            connection, _ = server.accept()
            with connection:
                zmtp_handshake(connection, b"PUSH")
                before = _rss_mb(child.process.pid)
                connection.sendall(bytes([0x02]) + (2**31).to_bytes(8, "big"))  # one 2 GiB part, announced
                chunk = bytes(1 << 20)
                try:
                    while sent < 300 << 20:
                        connection.sendall(chunk)
                        sent += len(chunk)
                except OSError:
                    pass  # disconnected: the point
            grown = _rss_mb(child.process.pid) - before
            assert requests.get(endpoints["rest"] + "/status", timeout=5).json()["state"] == "ok"
    finally:
        server.close()
    assert sent < 64 << 20, f"{sent >> 20} MB of one announced part accepted"
    assert grown < 50, f"buffer RSS grew by {grown:.0f} MB"


def test_replay_errors_and_silent_writer_expiry():
    """A malformed request gets an error reply; a writer that stops talking is expired and counted."""
    with running_buffer("tcp://127.0.0.1:1", session_timeout=0.5) as buffer:
        context = zmq.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(buffer.replay_address)
        try:
            dealer.send(b"not json")
            assert dealer.poll(DEADLINE * 1000)
            kind, body = dealer.recv_multipart()
            assert kind == b"error" and json.loads(body)["reason"] == "not_json"
            dealer.send(json.dumps({"type": "request", "start_pulse_id": -1}).encode())
            assert dealer.poll(DEADLINE * 1000)
            assert json.loads(dealer.recv_multipart()[1])["reason"] == "bad_field"
            dealer.send(json.dumps({"type": "credit", "received": 0}).encode())
            assert dealer.poll(DEADLINE * 1000)
            assert json.loads(dealer.recv_multipart()[1])["reason"] == "unknown_session"
            dealer.send(json.dumps({"type": "request", "start_pulse_id": 0}).encode())
            assert dealer.poll(DEADLINE * 1000)
            assert dealer.recv_multipart()[0] == b"accepted"
            statistics = wait_for(lambda: (s := buffer.statistics()).replay.expired == 1 and s, DEADLINE)
        finally:
            dealer.close()
            context.term()
    assert statistics.replay.active_sessions == 0 and statistics.replay.refused == 2


def test_hostile_replay_messages_are_refused_and_the_buffer_lives_on():
    """Deeply nested JSON, huge and many-part messages on the replay port: refused, counted, never fatal."""
    with running_buffer("tcp://127.0.0.1:1") as buffer:
        context = zmq.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(buffer.replay_address)
        try:
            dealer.send(b"[" * 1000 + b"]" * 1000)  # 2 kB, 1000 levels deep
            assert dealer.poll(DEADLINE * 1000)
            kind, body = dealer.recv_multipart()
            assert kind == b"error" and json.loads(body)["reason"] == "not_json"
            dealer.send(json.dumps({"type": "credit", "received": 1, "pad": "x" * 5000}).encode())
            assert dealer.poll(DEADLINE * 1000)
            assert json.loads(dealer.recv_multipart()[1])["reason"] == "bad_frames"  # larger than a message can be
            dealer.send_multipart([b"{}"] * 3)
            assert dealer.poll(DEADLINE * 1000)
            assert json.loads(dealer.recv_multipart()[1])["reason"] == "bad_frames"
            # Beyond the socket's limit: libzmq disconnects the sender before anything is read.
            rude = context.socket(zmq.DEALER)
            rude.setsockopt(zmq.LINGER, 0)
            rude.connect(buffer.replay_address)
            rude.send(b'{"type": "request", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
            rude.send(json.dumps({"type": "credit", "received": 1, "pad": "x" * 100_000}).encode())
            rude.close()
            # ... and the replay endpoint still works for a well-behaved writer.
            with ReplayClient(buffer.replay_address, start_pulse_id=0, heartbeat_interval=0.2) as client:
                wait_for(lambda: client.receive(0.1) is None and client.accepted is not None, DEADLINE,
                         message="the buffer accepting a request")
            wait_for(lambda: buffer.statistics().replay.refused >= 3, DEADLINE, message="the refusals counted")
            assert not buffer.stopped.is_set()
        finally:
            dealer.close()
            context.term()


def test_analyzer_logs_anomalies(caplog):
    with push_source() as (source, address), caplog.at_level("INFO", logger="sf_bsread_writer.buffer"), \
            running_buffer(address, analyzer=True) as buffer:
        # ... then a source restart at 5, confirmed by the messages after it
        for pulse_id, channel in ((10, "A"), (11, "A"), (12, "A"), (20, "A"), (21, "B"), (5, "B"), (6, "B"),
                                  (7, "B")):
            source.send_multipart(build_message(pulse_id, [{"name": channel, "type": "int32"}], [1]))
        statistics = wait_for(lambda: (s := buffer.statistics()).pulse_ids.resets == 1 and s,
                              DEADLINE, message="the confirmed reset")
    text = caplog.text
    assert "jumped to 20" in text and "header changed at pulse 21" in text and "went back from 21 to 5" in text
    assert statistics.pulse_ids.jumps == 1 and statistics.pulse_ids.resets == 1
    assert statistics.header_changes == 1


def test_analyzer_logs_each_channel_missing_from_a_pulse_in_the_originals_words(caplog, monkeypatch):
    from sf_bsread_writer.buffer import ingest

    monkeypatch.setattr(ingest, "ANALYZER_MAX_LINES", 2)  # the cap, seen with a small stream
    channels = [{"name": name, "type": "int32"} for name in ("A", "B", "C", "D")]
    with push_source() as (source, address), caplog.at_level("INFO", logger="sf_bsread_writer.buffer"), \
            running_buffer(address, analyzer=True) as buffer:
        source.send_multipart(build_message(1, channels, [1, None, 3, 4]))
        source.send_multipart(build_message(2, channels, [None, None, None, 4]))
        received(buffer, 2)
    text = caplog.text
    assert "Channel 'B' data missing in pulse_id 1." in text
    assert "Channel 'A' data missing in pulse_id 2." in text and "Channel 'B' data missing in pulse_id 2." in text
    assert "Channel 'C' data missing in pulse_id 2." not in text
    assert "... and 1 more channels data missing in pulse_id 2." in text
    assert "Channel 'D'" not in text


def test_a_source_without_a_plausible_clock_is_timed_by_the_buffers_receive_time(caplog):
    """bsread.timebase at ingest: the ring indexes, and the replay sends, the receive time instead."""
    wall = 1_700_000_000.0
    channels = [{"name": "A", "type": "int32"}]
    with push_source() as (source, address), caplog.at_level("INFO", logger="sf_bsread_writer.buffer"), \
            running_buffer(address, wall_clock=lambda: wall) as buffer:
        source.send_multipart(build_message(1, channels, [1], timestamp=(0, 0)))  # no clock
        source.send_multipart(build_message(2, channels, [2], timestamp=wall - 0.5))  # a plausible one
        source.send_multipart(build_message(3, channels, [3], timestamp=wall + 7200))  # two hours ahead
        statistics = received(buffer, 3)
        data, _ = replay_all(buffer.replay_address, 1, 3)
    assert [event.time for event in data] == [wall, wall - 0.5, wall]
    assert statistics.source.timed_by_receive == 2 and statistics.source.clock_offset_seconds == 7200.0
    text = caplog.text
    assert "pulse_id 1: the source's global timestamp 0.000000 is absent" in text
    assert "pulse_id 2: the source's global timestamp is plausible again" in text
    # Rate limited (a clock hovering at the limit must not log every message): the second such warning
    # within 5 s is suppressed; the counters above tell the whole story.
    assert "+7200.000 s off the receive time" not in text


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_operators_read_the_stream_s_story_at_info_without_analyzer(caplog):
    """First message, a jump, a header change, the source idle and back: once each, at INFO."""
    clock = ManualClock()

    def send(pulse_id: int, channel: str = "A") -> None:
        source.send_multipart(build_message(pulse_id, [{"name": channel, "type": "int32"}], [1]))

    def received(count: int) -> None:
        wait_for(lambda: buffer.statistics().received >= count, DEADLINE, message=f"{count} messages")

    # A snapshot every loop turn: the clock moves only when the test says so.
    with push_source() as (source, address), caplog.at_level("INFO", logger="sf_bsread_writer.buffer"), \
            running_buffer(address, clock=clock, snapshot_interval=0.0) as buffer:
        for pulse_id in (10, 11, 12):
            send(pulse_id)
        received(3)
        send(20)  # a jump
        send(21, "B")  # a header change
        received(5)
        clock.now += 6  # nothing for 6 s of the loop's clock
        wait_for(lambda: "idle" in caplog.text, DEADLINE, message="the source idle")
        send(22, "B")
        received(6)
    text = caplog.text
    assert text.count("first message from") == 1 and "pulse_id 10, 1 channels" in text
    assert "pulse id jumped to 20: 7 pulses skipped" in text
    assert "data header changed at pulse 21: 1 channels" in text
    assert text.count("idle: no message for") == 1 and "last pulse_id 21" in text
    assert "source back after" in text and "at pulse_id 22" in text


# ---------------------------------------------------------------------------
# status.py (pure)
# ---------------------------------------------------------------------------
def test_status_answers_from_a_snapshot():
    from dataclasses import replace

    from sf_bsread_writer import status

    buffer = Buffer(BufferSettings("tcp://127.0.0.1:1", name='quote"me'))  # never run: the initial snapshot
    snapshot = buffer.statistics()
    assert snapshot.describe() == "waiting_for_source"
    assert snapshot.status_answer()["state"] == "ok"
    answer = snapshot.statistics_answer()
    assert answer["statistics"]["ring"]["max_messages"] == 1000
    json.dumps(answer)  # serialisable as is
    text = status.prometheus_text(replace(snapshot, rejected={"part_count": 3}))
    assert 'sf_bsread_buffer_rejected_messages_total{buffer="quote\\"me",reason="part_count"} 3' in text
    assert "sf_bsread_buffer_newest_pulse_id{" not in text  # None: no sample, the family stays
    assert "# TYPE sf_bsread_buffer_newest_pulse_id gauge" in text
    idle = replace(snapshot, source=replace(snapshot.source, connected_once=True, idle_seconds=60.0))
    assert idle.describe() == "source_idle"
