"""The buffer's loopback feed: data and status on one socket, one reader (sf_bsread_writer.feed).

The reader on its own against a real PUB socket (messages, the status as a
typed BufferStatus, a status that is no status counted and dropped), and
the web service of a buffer without an HTTP API (rest_port None): its
status page still shows the buffer's status, which travels on the feed.
A cut message replaced by the reader: tests/test_partsio.py, beside the
other owners.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import requests
import zmq

from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.bsread.message import MessageParser
from sf_bsread_writer.bsread.spec import DEFAULT_MAX_MESSAGE_BYTES
from sf_bsread_writer.buffer.service import Buffer
from sf_bsread_writer.buffer.settings import BufferSettings
from sf_bsread_writer.feed import (
    STATUS_HEAD,
    FeedReader,
    is_status_message,
    status_message,
)
from sf_bsread_writer.status import BufferStatus
from sf_bsread_writer.tools.simulate import Simulator

from .helpers import STREAM_DEADLINE, children_of, process_gone, wait_for

CHANNELS = [{"name": "X", "type": "int64"}]


@pytest.fixture
def publisher():
    context = zmq.Context()
    socket = context.socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    yield socket, f"tcp://127.0.0.1:{port}"
    socket.close(linger=0)
    context.term()


def _first(reader: FeedReader, publish, kind: type, what: str):
    """Publish until the reader returns a ``kind`` (a SUB joins late: the first messages may pass it by)."""
    def attempt():
        publish()
        got = reader.receive(0.05)
        return got if isinstance(got, kind) else None
    return wait_for(attempt, STREAM_DEADLINE, message=what)


def test_the_reader_gives_messages_as_received_and_the_status_as_a_buffer_status(publisher):
    socket, address = publisher
    status = Buffer(BufferSettings("tcp://127.0.0.1:9", rest_port=None, name="FEEDTEST")).statistics()
    with FeedReader(address) as reader:
        got = _first(reader, lambda: socket.send_multipart(status_message(status)), BufferStatus, "a status")
        assert got == status  # the typed record, whole: the same as GET /statistics would give
        frames = build_message(7, CHANNELS, [42])
        parts = _first(reader, lambda: socket.send_multipart(frames), object, "a data message")
        while isinstance(parts, BufferStatus):  # statuses still queued
            parts = reader.receive(1.0)
        assert [bytes(part) for part in parts] == frames
        assert MessageParser().parse(parts).pulse_id == 7
        assert reader.messages >= 1 and reader.statuses >= 1 and reader.status_rejected == 0


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"name": "x"}', b"[" * 100_000, b"1" * (2 << 20)])
def test_a_status_message_that_is_no_status_is_counted_and_dropped(publisher, body):
    """From another process: never raised, never taken for data; the next message is read as usual."""
    socket, address = publisher
    with FeedReader(address) as reader:
        wait_for(lambda: socket.send_multipart([STATUS_HEAD, body]) or reader.receive(0.05) or reader.status_rejected,
                 STREAM_DEADLINE,
                 message="the bad status counted")
        frames = build_message(8, CHANNELS, [1])
        parts = wait_for(lambda: socket.send_multipart(frames) or reader.receive(0.05), STREAM_DEADLINE,
                         message="the next message")
        assert [bytes(part) for part in parts] == frames
        assert reader.statuses == 0


def test_an_oversized_message_is_counted_and_dropped_and_the_reader_goes_on():
    """Every network-facing socket has a bound, the feed's too, from the same limit as the buffer's ingest
    (``max_message_bytes``): a message larger than it is counted (``oversize``) and dropped; a part larger than
    twice the limit is refused by ZeroMQ at its header before any of it is buffered (libzmq drops the connection
    for good) and the reader connects anew. Either way the next message is read as usual. (PUSH -> PULL: each
    send reaches the reader.)"""
    limit = 4096
    context = zmq.Context()
    pusher = context.socket(zmq.PUSH)
    pusher.setsockopt(zmq.LINGER, 0)
    pusher.setsockopt(zmq.SNDTIMEO, int(STREAM_DEADLINE * 1000))
    address = f"tcp://127.0.0.1:{pusher.bind_to_random_port('tcp://127.0.0.1')}"
    image = [{"name": "IMG", "type": "uint8", "shape": [6000]}]
    try:
        with FeedReader(address, "pull") as default:  # the web service's and the gateway's: the buffer's default
            assert default.socket.getsockopt(zmq.MAXMSGSIZE) == 2 * DEFAULT_MAX_MESSAGE_BYTES
        with FeedReader(address, "pull", max_message_bytes=limit) as reader:
            def next_item():
                return wait_for(lambda: reader.receive(0.05) or None, STREAM_DEADLINE, message="a message")

            big = build_message(9, image, [np.zeros(6000, np.uint8)])  # between the limit and twice it
            assert limit < sum(len(part) for part in big) and all(len(part) < 2 * limit for part in big)
            pusher.send_multipart(big)
            pusher.send_multipart(build_message(10, CHANNELS, [10]))
            assert MessageParser().parse(next_item()).pulse_id == 10
            assert reader.oversize == 1 and reader.messages == 1

            pusher.send_multipart(build_message(11, CHANNELS, [11])[:1] + [b"\0" * (3 * limit)])

            def sent_again_and_received():  # what was queued for the dropped connection went with it
                try:
                    pusher.send_multipart(build_message(12, CHANNELS, [12]), zmq.NOBLOCK)
                except zmq.Again:
                    pass  # not connected again yet
                return reader.receive(0.05) or None

            after = wait_for(sent_again_and_received, STREAM_DEADLINE, message="a message after the refused part")
            assert MessageParser().parse(after).pulse_id == 12
            assert reader.oversize == 1  # 11 never reached the reader: ZeroMQ refused it
            assert reader.reconnects == 1  # libzmq does not connect again after a refused part: the reader does
    finally:
        pusher.close(0)
        context.term()


def test_a_feed_bound_anew_is_reconnected_by_zeromq_and_never_connected_twice():
    """The buffer binds a feed again (after a cut message) or restarts: libzmq connects again by itself, and the
    reader's watch (transport.connection) must not add a second connection: a SUB with two connections to one
    PUB gets every message twice. Watched for twice the time after which the watch would connect anew."""
    import time

    from sf_bsread_writer.transport.connection import GIVEN_UP_SECONDS
    from sf_bsread_writer.transport.partsio import bind_again

    context = zmq.Context()
    publisher = context.socket(zmq.PUB)
    publisher.setsockopt(zmq.LINGER, 0)
    port = publisher.bind_to_random_port("tcp://127.0.0.1")
    try:
        with FeedReader(f"tcp://127.0.0.1:{port}") as reader:
            _first(reader, lambda: publisher.send_multipart(build_message(1, CHANNELS, [1])), object, "a message")
            publisher.close(0)
            publisher = context.socket(zmq.PUB)
            publisher.setsockopt(zmq.LINGER, 0)
            bind_again(publisher, f"tcp://127.0.0.1:{port}")  # as the buffer does (the old listener closes late)
            _first(reader, lambda: publisher.send_multipart(build_message(2, CHANNELS, [2])), object,
                   "a message from the feed bound anew")
            pulse_ids = []
            watched_until = time.monotonic() + 2 * GIVEN_UP_SECONDS
            for pulse_id in range(3, 10**6):
                if time.monotonic() > watched_until:
                    break
                publisher.send_multipart(build_message(pulse_id, CHANNELS, [pulse_id]))
                item = reader.receive(0.02)
                while item is not None:
                    pulse_ids.append(MessageParser().parse(item).pulse_id)
                    item = reader.receive(0)
            assert pulse_ids and len(pulse_ids) == len(set(pulse_ids)), pulse_ids  # each message once
            assert reader.reconnects == 0
    finally:
        publisher.close(0)
        context.term()


def test_a_bsread_parser_ignores_the_status_message_as_a_control_message():
    from sf_bsread_writer.bsread.spec import IgnoredMessage

    status = Buffer(BufferSettings("tcp://127.0.0.1:9", rest_port=None)).statistics()
    frames = status_message(status)
    assert is_status_message(frames) and not is_status_message(build_message(1, CHANNELS, [1]))
    with pytest.raises(IgnoredMessage):
        MessageParser().parse(frames)


def test_the_web_service_shows_the_buffers_status_without_its_http_api():
    """rest_port None: no HTTP to poll; /api/v1/status answers from the status on the web feed."""
    pytest.importorskip("aiohttp", reason="aiohttp is not installed: the web service cannot run")
    simulator = Simulator("mixed", rate=50)
    source = simulator.open()
    buffer = Buffer(BufferSettings(source, rest_port=None, web=True, web_port=0, name="NOHTTP"))
    threads = [threading.Thread(target=buffer.run, daemon=True),
               threading.Thread(target=simulator.run, args=(0,), daemon=True)]
    for thread in threads:
        thread.start()
    web_pids: list[int] = []
    try:
        assert buffer.started.wait(STREAM_DEADLINE) and not buffer.stopped.is_set(), "the buffer did not start"
        assert buffer.rest_url is None
        url = buffer.statistics().endpoints.web
        web_pids = wait_for(lambda: children_of_this_process("sf_bsread_writer.web"), STREAM_DEADLINE,
                            message="the web service started")

        def status():
            try:
                answer = requests.get(url + "/api/v1/status", timeout=5)
            except requests.RequestException:  # not listening yet, or its listener not served yet
                return None
            document = answer.json()
            return document if document["state"] == "ok" and document["look_back"]["messages"] > 0 else None

        document = wait_for(status, STREAM_DEADLINE, interval=0.1, message="the buffer's status on the web page")
        assert document["buffer"]["name"] == "NOHTTP" and document["status"] == "receiving"
        assert document["buffer"]["endpoints"]["rest"] is None
    finally:
        simulator.stop()
        threads[1].join(timeout=10)
        buffer.stop()
        threads[0].join(timeout=STREAM_DEADLINE)
        simulator.close(linger=0)
    assert all(process_gone(pid) for pid in web_pids), "the web service outlived its buffer"


def children_of_this_process(marker: str) -> list[int]:
    import os

    return children_of(os.getpid(), marker)
