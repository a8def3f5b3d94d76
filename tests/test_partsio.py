"""Whole messages in one call (transport.partsio), on BOTH implementations: the compiled extension and pure pyzmq.

Real ZeroMQ sockets on loopback. Every test runs once per implementation
available here; where the extension is not built the compiled runs are
skipped, saying why (and test_the_extension_is_active_where_it_was_built
fails if it was built but does not load).
"""
import glob
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq

from sf_bsread_writer.bsread.parts import LARGE_PART_BYTES, PackedParts, pack
from sf_bsread_writer.transport import partsio

IMPLEMENTATIONS = ["compiled", "python"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
    if request.param not in partsio.AVAILABLE:
        pytest.skip(f"compiled message I/O not available: {partsio.FALLBACK_REASON}")
    return request.param


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _pair(context, kind_out=zmq.PUSH, kind_in=zmq.PULL):
    receiver = context.socket(kind_in)
    receiver.setsockopt(zmq.LINGER, 0)
    port = receiver.bind_to_random_port("tcp://127.0.0.1")
    sender = context.socket(kind_out)
    sender.setsockopt(zmq.LINGER, 0)
    sender.connect(f"tcp://127.0.0.1:{port}")
    return sender, receiver


def _message(n_channels=3, image_bytes=0, seed=0):
    rng = np.random.default_rng(seed)
    frames = [b'{"htype": "bsr_m-1.1", "pulse_id": 1}', b"data header " * 20]
    for i in range(n_channels):
        frames.append(rng.integers(0, 256, 8, dtype=np.uint8).tobytes() if i % 3 != 2 else b"")
        frames.append(rng.integers(0, 256, 16, dtype=np.uint8).tobytes())
    if image_bytes:
        frames += [rng.integers(0, 256, image_bytes, dtype=np.uint8).tobytes(), b"s" * 16]
    return frames


SHAPES = {
    "one part": [b"only"],
    "two parts": [b"main", b"header"],
    "scalars": _message(500),
    "image": _message(2, image_bytes=3 * LARGE_PART_BYTES + 11),
    "at the threshold": [b"main", b"h", b"x" * LARGE_PART_BYTES, b"y" * (LARGE_PART_BYTES - 1), b""],
    "large header": [b"main", b"H" * (LARGE_PART_BYTES + 1), b"v"],
}


@pytest.mark.parametrize("shape", SHAPES)
def test_a_message_arrives_whole_and_exact(context, implementation, shape):
    frames = SHAPES[shape]
    sender, receiver = _pair(context)
    sender.send_multipart(frames)
    prefix, parts = partsio.PartsReceiver(implementation=implementation).receive(receiver)
    assert prefix == ()
    assert isinstance(parts, PackedParts)
    assert [bytes(p) for p in parts] == frames
    assert parts.nbytes == sum(map(len, frames))


@pytest.mark.parametrize("shape", SHAPES)
def test_a_packed_message_is_sent_whole_and_exact_with_its_prefix(context, implementation, shape):
    frames = SHAPES[shape]
    sender, receiver = _pair(context)
    partsio.send_parts(sender, pack(frames), prefix=(b"route", b"kind"), implementation=implementation)
    assert receiver.recv_multipart() == [b"route", b"kind", *frames]


def test_the_prefix_is_split_off_and_the_rest_packed(context, implementation):
    frames = _message(4, image_bytes=LARGE_PART_BYTES)
    sender, receiver = _pair(context)
    sender.send_multipart([b"data 7 1.5", *frames])
    sender.send_multipart([b"end"])
    receive = partsio.PartsReceiver(implementation=implementation).receive
    prefix, parts = receive(receiver, 0, 1)
    assert prefix == (b"data 7 1.5",) and [bytes(p) for p in parts] == frames
    assert receive(receiver, 0, 1) == ((b"end",), None)  # nothing after the prefix


def test_received_parts_go_out_again_by_reference_to_many_peers(context, implementation):
    """The buffer's case: what ingest received is sent to the live output and to writers, any number of times."""
    frames = _message(3, image_bytes=2 * LARGE_PART_BYTES)
    sender, receiver = _pair(context)
    sender.send_multipart(frames)
    _, parts = partsio.PartsReceiver(implementation=implementation).receive(receiver)
    large = parts.large[0]
    assert bytes(large) == frames[-2] and len(large) == len(frames[-2])
    if implementation == "compiled":  # pyzmq's own Frame hands out a writable view
        assert memoryview(large).readonly
    outputs = [_pair(context) for _ in range(3)]
    for _ in range(2):
        for out, _ in outputs:
            partsio.send_parts(out, parts, implementation=implementation)
    for _, inbox in outputs:
        assert inbox.recv_multipart() == frames and inbox.recv_multipart() == frames
    assert bytes(parts.large[0]) == frames[-2]  # still intact after every send


def test_consecutive_messages_share_their_header_and_layout(context, implementation):
    sender, receiver = _pair(context)
    receive = partsio.PartsReceiver(implementation=implementation).receive
    sender.send_multipart(_message(10, seed=1))
    sender.send_multipart(_message(10, seed=2))
    _, first = receive(receiver)
    _, second = receive(receiver)
    assert second.header is first.header and second.layout is first.layout
    assert bytes(second[2]) != bytes(first[2])


def test_nothing_queued_raises_again_with_noblock(context, implementation):
    _, receiver = _pair(context)
    with pytest.raises(zmq.Again):
        partsio.PartsReceiver(implementation=implementation).receive(receiver, zmq.NOBLOCK)


def test_a_nonblocking_send_that_cannot_go_raises_again_and_sends_nothing(context, implementation):
    lonely = context.socket(zmq.PUSH)  # bound, no peer: a PUSH cannot send
    lonely.setsockopt(zmq.LINGER, 0)
    port = lonely.bind_to_random_port("tcp://127.0.0.1")
    with pytest.raises(zmq.Again):
        partsio.send_parts(lonely, pack(_message(3)), nonblocking=True, implementation=implementation)
    late = context.socket(zmq.PULL)
    late.connect(f"tcp://127.0.0.1:{port}")
    partsio.send_parts(lonely, pack([b"after"]), implementation=implementation)
    assert late.recv_multipart() == [b"after"]  # the refused message left no parts behind


def test_an_unreachable_writer_raises_zmqerror_ehostunreach(context, implementation):
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:0")
    with pytest.raises(zmq.ZMQError) as error:
        partsio.send_parts(router, pack(_message(2)), prefix=(b"nobody",), nonblocking=True,
                           implementation=implementation)
    assert error.value.errno == zmq.EHOSTUNREACH


def test_both_implementations_speak_the_same_bytes(context):
    if "compiled" not in partsio.AVAILABLE:
        pytest.skip(f"compiled message I/O not available: {partsio.FALLBACK_REASON}")
    frames = _message(20, image_bytes=LARGE_PART_BYTES + 3)
    for receive_with, send_with in (("compiled", "python"), ("python", "compiled")):
        sender, receiver = _pair(context)
        inbox_out, inbox = _pair(context)
        sender.send_multipart(frames)
        _, parts = partsio.PartsReceiver(implementation=receive_with).receive(receiver)
        partsio.send_parts(inbox_out, parts, prefix=(b"p",), implementation=send_with)
        assert inbox.recv_multipart() == [b"p", *frames]


def test_a_blocked_receive_releases_the_gil(context, implementation):
    """Another Python thread runs while one waits in receive; then the message reaches the waiter."""
    sender, receiver = _pair(context)
    waiting = threading.Event()
    got = []

    def wait_for_message():
        waiting.set()
        got.append(partsio.PartsReceiver(implementation=implementation).receive(receiver)[1])

    thread = threading.Thread(target=wait_for_message, daemon=True)
    thread.start()
    assert waiting.wait(10)
    # Pure-Python work in this thread: it could not run while the waiter held the GIL
    # (the switch interval would hand the GIL back, but a holder blocked in C never releases it).
    total = sum(range(2_000_000))
    sender.send_multipart([b"wake", b"up"])
    thread.join(10)
    assert not thread.is_alive() and total and [bytes(p) for p in got[0]] == [b"wake", b"up"]


class _Interrupted(Exception):
    pass


def test_a_signal_during_a_blocked_receive_runs_its_handler(context, implementation):
    """EINTR: the handler runs; an exception from it ends the receive, as pyzmq's own recv does."""
    _, receiver = _pair(context)

    def handler(signum, frame):
        raise _Interrupted()

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(_Interrupted):
            partsio.PartsReceiver(implementation=implementation).receive(receiver)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_signal_whose_handler_returns_does_not_lose_the_receive(context, implementation):
    sender, receiver = _pair(context)

    def handler(signum, frame):
        sender.send_multipart([b"sent", b"from the handler"])  # after EINTR, the receive goes on and gets it

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        _, parts = partsio.PartsReceiver(implementation=implementation).receive(receiver)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert [bytes(p) for p in parts] == [b"sent", b"from the handler"]


def test_the_compiled_send_refuses_packed_parts_that_do_not_match_their_lengths(context):
    if "compiled" not in partsio.AVAILABLE:
        pytest.skip(f"compiled message I/O not available: {partsio.FALLBACK_REASON}")
    sender, receiver = _pair(context)
    good = pack([b"main", b"header", b"value", b"x" * LARGE_PART_BYTES])
    for bad in (PackedParts(good.layout, good.small[:-1], good.header, good.large),
                PackedParts(good.layout, good.small, b"other length", good.large),
                PackedParts(good.layout, good.small, good.header, ())):
        with pytest.raises(ValueError):
            partsio.send_parts(sender, bad, implementation="compiled")
    partsio.send_parts(sender, good, implementation="compiled")
    assert receiver.recv_multipart() == [b"main", b"header", b"value", b"x" * LARGE_PART_BYTES]


def test_the_extension_is_active_where_it_was_built():
    """A built extension that does not load would silently cost the speed: say why instead."""
    built = glob.glob(str(ROOT / "sf_bsread_writer" / "transport" / "_partsio*.so"))
    if not built:
        pytest.skip("the extension is not built here (no compiler at install?)")
    if os.environ.get(partsio.NO_EXTENSION_VARIABLE, "") not in ("", "0"):
        assert partsio.IMPLEMENTATION == "python"
        return
    assert partsio.IMPLEMENTATION == "compiled", partsio.FALLBACK_REASON


def test_the_variable_forces_the_pure_path():
    code = "from sf_bsread_writer.transport import partsio; print(partsio.IMPLEMENTATION, partsio.FALLBACK_REASON)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, partsio.NO_EXTENSION_VARIABLE: "1"}, check=True).stdout
    assert out.startswith("python SF_BSREAD_NO_EXTENSION=1")
