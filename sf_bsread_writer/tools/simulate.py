"""``sf_bsread_simulate``: a bsread source for demos and tests, built on bsread's own ``Sender``.

Using bsread's Sender (not our own ``protocol.build_message``) keeps the
tests honest: the buffer and the writer are fed by an independent
implementation of the format.

Every value is a pure function of the profile and the pulse id
(:func:`expected_values`), so a test can check byte for byte, at any point
downstream, what a given pulse must contain. Channels are declared once with
explicit metadata and sent with ``check_data=False``: bsread's
``send(data=...)`` re-infers the header on every send (an absent value
would flip a channel to float64 and change the hash), which is not what a
real source does.

Profiles
    camera   one uint16 image (``--image-shape WIDTHxHEIGHT``, bsread order)
    scalars  ``--n-channels`` float64 scalars
    mixed    every type (bool, int8..uint64, float32/64, string), a big-endian
             channel, a 1-D array, a small image, and a channel absent on
             most pulses (present when pulse_id % 10 == 0)
    demo     a camera image (bitshuffle_lz4), a spectrum (lz4), scalars and
             strings (used by ``make demo``)

``--compression`` applies to the array channels of camera/mixed (demo fixes
its own). Binds 127.0.0.1 by default; port 0 binds any free port. On start
the command prints ``READY {"address": "tcp://127.0.0.1:PORT", ...}``.
"""
from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

if TYPE_CHECKING:
    from bsread import Sender

from sf_bsread_writer import config, process
from sf_bsread_writer.process import ExitCode

__all__ = ["PROFILES", "Simulator", "channel_metadata", "expected_values", "parse_image_shape", "main"]

# The import path even when run as ``python -m`` (where __name__ is "__main__").
logger = logging.getLogger(__spec__.name)

PROFILES = ("camera", "scalars", "mixed", "demo")

# (name suffix, type) of the mixed profile's scalar channels
_MIXED_SCALARS = (
    ("BOOL", "bool"), ("INT8", "int8"), ("UINT8", "uint8"), ("INT16", "int16"), ("UINT16", "uint16"),
    ("INT32", "int32"), ("UINT32", "uint32"), ("INT64", "int64"), ("UINT64", "uint64"),
    ("FLOAT32", "float32"), ("FLOAT64", "float64"),
)
_MIXED_ARRAY_LENGTH = 16
_MIXED_IMAGE_SHAPE = (32, 24)  # bsread order: width (fastest) first
_DEMO_SPECTRUM_LENGTH = 256
_DEMO_SCALARS = 8
SLOW_CHANNEL_MODULO = 10  # the mixed profile's MIXED:SLOW is present when pulse_id % 10 == 0


def parse_image_shape(text: str | Sequence[int]) -> tuple[int, int]:
    """ "1280x1024" -> (1280, 1024): width (fastest dimension) first, as in a bsread header."""
    if not isinstance(text, str):
        width, height = text
        return int(width), int(height)
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image shape must look like WIDTHxHEIGHT, not {text!r}") from None
    if width < 1 or height < 1:
        raise ValueError(f"image shape must be positive, not {text!r}")
    return width, height


def channel_metadata(profile: str, compression: str = "none", n_channels: int = 500,
                     image_shape: str | Sequence[int] = (1280, 1024)) -> list[dict[str, Any]]:
    """The data-header channel entries of a profile (name, type, shape, encoding, compression)."""
    width, height = parse_image_shape(image_shape)

    def channel(name: str, type_: str, shape: Sequence[int] = (1,), encoding: str = "little",
                channel_compression: str = "none") -> dict[str, Any]:
        return {"name": name, "type": type_, "shape": list(shape), "encoding": encoding,
                "compression": channel_compression}

    if profile == "camera":
        return [channel("CAMERA:FPICTURE", "uint16", (width, height), channel_compression=compression)]
    if profile == "scalars":
        return [channel(f"SCALAR:CH{i:04d}", "float64") for i in range(n_channels)]
    if profile == "mixed":
        channels = [channel(f"MIXED:{suffix}", type_) for suffix, type_ in _MIXED_SCALARS]
        channels += [
            channel("MIXED:INT32_BE", "int32", encoding="big"),
            channel("MIXED:STRING", "string"),
            channel("MIXED:ARRAY", "float64", (_MIXED_ARRAY_LENGTH,), channel_compression=compression),
            channel("MIXED:IMAGE", "uint16", _MIXED_IMAGE_SHAPE, channel_compression=compression),
            channel("MIXED:SLOW", "float64"),
        ]
        return channels
    if profile == "demo":
        channels = [
            channel("DEMO:CAMERA", "uint16", (width, height), channel_compression="bitshuffle_lz4"),
            channel("DEMO:SPECTRUM", "float64", (_DEMO_SPECTRUM_LENGTH,), channel_compression="lz4"),
            channel("DEMO:COUNTER", "int64"),
            channel("DEMO:STATUS", "string"),
        ]
        channels += [channel(f"DEMO:SCALAR{i}", "float64") for i in range(_DEMO_SCALARS)]
        return channels
    raise ValueError(f"unknown profile {profile!r} (one of {', '.join(PROFILES)})")


@functools.lru_cache(maxsize=8)
def _ramp(n_elements: int) -> np.ndarray:
    ramp = np.arange(n_elements, dtype=np.uint32).astype(np.uint16)
    ramp.setflags(write=False)
    return ramp


def _image(pulse_id: int, width: int, height: int) -> np.ndarray:
    """A uint16 ramp shifted by the pulse id, numpy shape (height, width)."""
    return (_ramp(width * height) + np.uint16(pulse_id % 65536)).reshape(height, width)


def expected_values(profile: str, pulse_id: int, n_channels: int = 500,
                    image_shape: str | Sequence[int] = (1280, 1024)) -> dict[str, Any]:
    """Every channel's value for ``pulse_id``: numpy arrays of numpy shape (shape[::-1]), str, or None (absent).

    Scalars are arrays of shape (1,), with the channel's dtype and byte order,
    exactly as a decoder of the bsread message must return them.
    """
    width, height = parse_image_shape(image_shape)
    if profile == "camera":
        return {"CAMERA:FPICTURE": _image(pulse_id, width, height)}
    if profile == "scalars":
        base = float(pulse_id % 1_000_000)
        return {f"SCALAR:CH{i:04d}": np.array([base + i / 1000.0], dtype="<f8") for i in range(n_channels)}
    if profile == "mixed":
        values: dict[str, Any] = {}
        for suffix, type_ in _MIXED_SCALARS:
            if type_ == "bool":
                values[f"MIXED:{suffix}"] = np.array([pulse_id % 2 == 0], dtype="?")
            elif type_.startswith("float"):
                values[f"MIXED:{suffix}"] = np.array([pulse_id / 8.0], dtype=np.dtype(type_).newbyteorder("<"))
            else:
                dtype = np.dtype(type_).newbyteorder("<")
                span = int(np.iinfo(dtype).max) + 1
                value = pulse_id % span
                if np.iinfo(dtype).min < 0:
                    value = value - span // 2  # exercise negative numbers too
                values[f"MIXED:{suffix}"] = np.array([value], dtype=dtype)
        values["MIXED:INT32_BE"] = np.array([-(pulse_id % 100_000)], dtype=">i4")
        values["MIXED:STRING"] = f"pulse {pulse_id} \u00b5J"  # non-ASCII on purpose
        values["MIXED:ARRAY"] = np.arange(_MIXED_ARRAY_LENGTH, dtype="<f8") + pulse_id % 1000
        values["MIXED:IMAGE"] = _image(pulse_id, *_MIXED_IMAGE_SHAPE)
        values["MIXED:SLOW"] = (np.array([pulse_id * 0.5], dtype="<f8")
                                if pulse_id % SLOW_CHANNEL_MODULO == 0 else None)
        return values
    if profile == "demo":
        values = {
            "DEMO:CAMERA": _image(pulse_id, width, height),
            "DEMO:SPECTRUM": np.sin(np.arange(_DEMO_SPECTRUM_LENGTH, dtype="<f8") / 16.0 + pulse_id / 100.0),
            "DEMO:COUNTER": np.array([pulse_id], dtype="<i8"),
            "DEMO:STATUS": "running" if pulse_id % 100 else "checkpoint",
        }
        for i in range(_DEMO_SCALARS):
            values[f"DEMO:SCALAR{i}"] = np.array([np.cos(pulse_id / 50.0 + i)], dtype="<f8")
        return values
    raise ValueError(f"unknown profile {profile!r} (one of {', '.join(PROFILES)})")


class Simulator:
    """A bsread source (bsread's Sender) sending a profile's deterministic values.

    ``open()`` binds and returns the actual address (port 0 = any free
    port); ``run(count)`` sends until ``count`` messages were sent (0: until
    ``stop()``) at ``rate`` per second (0: as fast as the socket takes
    them); ``send_one()`` sends the next pulse. Usable from a thread:
    create and open in one thread, then hand it to another (the sockets
    are then used only there) and call ``stop()`` from anywhere.
    """

    def __init__(self, profile: str = "mixed", port: int = 0, bind: str = config.DEFAULT_BIND,
                 mode: str = "push", rate: float = 0.0, start_pulse_id: int = 0, pulse_id_step: int = 1,
                 compression: str = "none", n_channels: int = 500,
                 image_shape: str | Sequence[int] = (1280, 1024), queue_size: int = 10) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r} (one of {', '.join(PROFILES)})")
        if mode not in ("push", "pub"):
            raise ValueError(f"mode must be push or pub, not {mode!r}")
        if pulse_id_step < 1:
            raise ValueError("pulse_id_step must be >= 1")
        self.profile = profile
        self.port = port
        self.bind = bind
        self.mode = mode
        self.rate = rate
        self.pulse_id_step = pulse_id_step
        self.compression = compression
        self.n_channels = n_channels
        self.image_shape = parse_image_shape(image_shape)
        self.queue_size = queue_size
        # SwissFEL-like: pulse ids advance by one every 10 ms.
        self.next_pulse_id = start_pulse_id if start_pulse_id > 0 else int(time.time() * 100)
        self.sent = 0
        self.address: str | None = None
        self._sender: Sender | None = None
        self._stop = threading.Event()
        self._names = [entry["name"] for entry in
                       channel_metadata(profile, compression, n_channels, self.image_shape)]

    def open(self) -> str:
        """Bind the socket; return the address to connect to."""
        # bsread imported here, not at the top: it loads bitshuffle (OpenMP), and main() sets OMP_NUM_THREADS first.
        from bsread import PUB, PUSH, Sender

        sender = Sender(queue_size=self.queue_size, port=self.port, address=f"tcp://{self.bind}",
                        mode=PUB if self.mode == "pub" else PUSH, block=True, send_timeout=100)
        for entry in channel_metadata(self.profile, self.compression, self.n_channels, self.image_shape):
            metadata = {key: value for key, value in entry.items() if key != "name"}
            sender.add_channel(entry["name"], metadata=metadata)
        sender.open()
        self._sender = sender
        self.address = sender.stream.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.address

    def _values(self, pulse_id: int) -> list[Any]:
        values = expected_values(self.profile, pulse_id, self.n_channels, self.image_shape)
        return [values[name] for name in self._names]

    def send_one(self) -> int | None:
        """Send the next pulse (waiting for a peer as long as needed); its pulse id, or None if stopped."""
        assert self._sender is not None, "open() first"
        pulse_id = self.next_pulse_id
        values = self._values(pulse_id)
        while True:
            try:
                self._sender.send(*values, pulse_id=pulse_id, timestamp=time.time(), check_data=False)
                break
            except zmq.Again:  # no peer or its queue is full: retry until stopped
                if self._stop.is_set():
                    return None
        self.next_pulse_id = pulse_id + self.pulse_id_step
        self.sent += 1
        return pulse_id

    def run(self, count: int = 0) -> int:
        """Send ``count`` messages (0: until stop()); returns how many were sent."""
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        next_time = time.monotonic()
        sent = 0
        while not self._stop.is_set() and (count <= 0 or sent < count):
            if interval:
                delay = next_time - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
                # Late (e.g. no consumer for a while): do not burst to catch up.
                next_time = max(next_time + interval, time.monotonic() - interval)
            if self.send_one() is None:
                break
            sent += 1
        return sent

    def stop(self) -> None:
        self._stop.set()

    def close(self, linger: float = 1.0) -> None:
        """Close the socket, giving queued messages up to ``linger`` seconds to leave; idempotent."""
        if self._sender is not None:
            # Not Sender.close(): mflow tries to disconnect() a bound socket and logs a failure.
            stream = self._sender.stream
            stream.socket.close(linger=int(linger * 1000))
            stream.context.term()
            self._sender.status_stream_open = False
            self._sender = None

    def __enter__(self) -> "Simulator":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point ``sf_bsread_simulate``; returns the exit code."""
    process.service_start()  # first: the process-wide knobs, before anything loads bitshuffle
    args = config.parse_args("sf_bsread_simulate", "A bsread source (bsread's own Sender) for demos and tests.",
                             config.SIMULATE_OPTIONS, config.SIMULATE_ENV_PREFIX, argv)
    process.configure_logging(args.log_level)
    try:
        simulator = Simulator(args.profile, args.port, args.bind, args.mode, args.rate, args.start_pulse_id,
                              args.pulse_id_step, args.compression, args.n_channels, args.image_shape)
    except ValueError as error:
        logger.error("%s", error)
        return ExitCode.CONFIGURATION

    process.stop_on_signals(lambda name: simulator.stop())
    process.survive_hangup("the terminal is gone: the simulator goes on (SIGTERM stops it)")
    try:
        address = simulator.open()
    except (RuntimeError, zmq.ZMQError) as error:  # bsread's Sender says RuntimeError("Unable to bind ...")
        logger.error("cannot bind: %s", error)
        return ExitCode.CONFIGURATION  # the port or address given cannot be served: a retry fails the same way
    try:
        process.print_ready({"address": address, "profile": args.profile, "mode": args.mode,
                             "first_pulse_id": simulator.next_pulse_id})
        sent = simulator.run(args.count)
        logger.info("sent %d messages, last pulse id %d", sent, simulator.next_pulse_id - simulator.pulse_id_step)
    finally:
        simulator.close()
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
