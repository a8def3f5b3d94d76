"""Shared pieces of the benchmarks: stream profiles, a fast raw sender, child processes, RSS.

The profiles are real bsread messages built once with ``protocol.build_message``;
the sender then only swaps in a fresh main header (pulse_id, timestamp) per
message and sends the other parts as pre-built ``zmq.Frame`` objects, so that
it is never the bottleneck of what is being measured.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before anything loads bitshuffle

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import helpers  # Child, free_port, children_of: one copy, the tests'
from tests.helpers import children_of, free_port  # noqa: F401  (offered to the benchmarks)

PROFILES = ("camera", "scalars", "mixed")  # also scalarsN: N float64 channels (scalars = scalars500)
FIRST_PULSE_ID = 10_000_000_000


def profile_message(profile: str, pulse_id: int = FIRST_PULSE_ID) -> list[bytes]:
    """One bsread message of the profile, as bsread's Sender would send it."""
    from sf_bsread_writer.bsread.build import build_message

    rng = np.random.default_rng(1)
    if profile == "camera":  # 1280x1024 uint16, uncompressed: 2.6 MB in one part
        channels = [{"name": "CAM:FPICTURE", "type": "uint16", "shape": [1280, 1024]}]
        values = [rng.integers(0, 4096, size=(1024, 1280), dtype=np.uint16)]
    elif profile == "camera1m":  # 1024x512 uint16: 1 MiB in one part (the archive's camera target, issue 23)
        channels = [{"name": "CAM:FPICTURE", "type": "uint16", "shape": [1024, 512]}]
        values = [rng.integers(0, 4096, size=(512, 1024), dtype=np.uint16)]
    elif profile.startswith("scalars") and (profile[7:].isdigit() or profile == "scalars"):
        # 500 float64 channels by default: 1002 parts of 8/16 bytes + ~40 KB data header
        n = int(profile[7:] or 500)
        channels = [{"name": f"SARFE10-PBPG050:SIGNAL-{i:03d}", "type": "float64"} for i in range(n)]
        values = [float(i) for i in range(n)]
    elif profile == "mixed":
        channels = [{"name": f"SCALAR-{i}", "type": "float64"} for i in range(4)]
        channels += [{"name": "STATUS", "type": "string"},
                     {"name": "WAVEFORM", "type": "float64", "shape": [100_000]},
                     {"name": "SMALL:IMAGE", "type": "uint16", "shape": [256, 256],
                      "compression": "bitshuffle_lz4"}]
        values = [1.5, 2.5, 3.5, 4.5, "running",
                  rng.standard_normal(100_000),
                  (rng.integers(0, 64, size=(256, 256), dtype=np.uint16))]
    else:
        raise ValueError(f"unknown profile {profile!r}; one of {PROFILES}")
    return build_message(pulse_id, channels, values, timestamp=1_700_000_000.0)




class HeaderFactory:
    """Main headers for consecutive pulse ids, cheaply (string formatting, not json.dumps)."""

    def __init__(self, template: bytes) -> None:
        header = json.loads(template)
        self.hash = header["hash"]
        self.dh_compression = header.get("dh_compression")

    def __call__(self, pulse_id: int, timestamp: float) -> bytes:
        sec = int(timestamp)
        ns = int((timestamp - sec) * 1e9)
        extra = f', "dh_compression": "{self.dh_compression}"' if self.dh_compression else ""
        return (f'{{"htype": "bsr_m-1.1", "pulse_id": {pulse_id}, "global_timestamp": '
                f'{{"sec": {sec}, "ns": {ns}}}, "hash": "{self.hash}"{extra}}}').encode()


def run_sender(profile: str, port: int, rate: float = 0.0, hwm: int = 50) -> None:
    """Bind a PUSH socket on 127.0.0.1:port and send the profile forever (rate 0: as fast as possible)."""
    import zmq

    template = profile_message(profile)
    headers = HeaderFactory(template[0])
    frames = [zmq.Frame(part) for part in template[1:]]
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("READY", flush=True)
    pulse_id = FIRST_PULSE_ID
    start = time.time()
    interval = 1.0 / rate if rate else 0.0
    while True:
        sock.send(headers(pulse_id, time.time()), zmq.SNDMORE)
        sock.send_multipart(frames, copy=False)
        pulse_id += 1
        if interval:
            delay = start + (pulse_id - FIRST_PULSE_ID) * interval - time.time()
            if delay > 0:
                time.sleep(delay)


def message_nbytes(profile: str) -> int:
    return sum(map(len, profile_message(profile)))


class Child(helpers.Child):
    """A helper subprocess that prints a READY line: the constructor returns once it did (``ready_line``).

    tests/helpers.py's Child underneath (output read in a thread, SIGTERM
    then SIGKILL on stop, dies with the benchmark); only the last
    ``OUTPUT_LINES`` lines of a long run are kept (``output()``).
    """

    OUTPUT_LINES = 200

    def __init__(self, args: list[str], ready: str = "READY", timeout: float = 30.0,
                 env: dict[str, str] | None = None) -> None:
        # A child told where to import from (a baseline's PYTHONPATH) runs in a neutral folder: `python -m`
        # puts its working directory first on sys.path, and a benchmark started in a checkout would
        # otherwise import that checkout, whatever PYTHONPATH says (issue 24: "baseline" was this tree).
        cwd = tempfile.gettempdir() if env and "PYTHONPATH" in env else None
        super().__init__(args, env=env, cwd=cwd, max_lines=self.OUTPUT_LINES)
        try:
            self.ready_line = self.wait_for_line(lambda line: line.startswith(ready), timeout).strip()
        except AssertionError as error:  # exited, or silent past the timeout
            self.stop()
            raise RuntimeError(f"{args[:4]}: no {ready!r} line: {error}") from None

    def rss_bytes(self) -> int:
        return rss_of(self.process.pid)


def baseline_site(tree: str | os.PathLike) -> Path:
    """A directory for PYTHONPATH that makes a child import sf_bsread_writer from ``tree`` (a baseline run).

    The checkout installed in the venv is editable (a meta-path finder from a
    .pth file), which would win over PYTHONPATH; the sitecustomize written
    here removes that finder and puts ``tree`` first.
    """
    tree = Path(tree).resolve()
    site = Path(tempfile.gettempdir()) / f"sf_bsread_baseline_site_{zlib.crc32(str(tree).encode()):08x}"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        f"sys.path.insert(0, {str(tree)!r})\n")
    return site


def rss_of(pid: int | str = "self") -> int:
    """Resident set size in bytes (from /proc/PID/statm)."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def machine_note() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


# ---------------------------------------------------------------- raw ZMTP 3.0 ends (cheap sender and consumer)
#
# pyzmq costs a few microseconds per part; a 500-channel message has 1002
# parts. A pyzmq sender and consumer would each cost as much CPU as the relay
# being measured, on a 2-core machine. These speak ZMTP 3.0 (NULL mechanism)
# over a plain TCP socket instead: the sender writes a pre-encoded message
# with one sendmsg(), the consumer only walks the frame headers.

import socket as _socket
import struct as _struct

ZMTP_GREETING = (b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00")
                 + b"\x00" + b"\x00" * 31)


def _zmtp_ready(socket_type: bytes) -> bytes:
    body = b"\x05READY" + bytes([11]) + b"Socket-Type" + _struct.pack(">I", len(socket_type)) + socket_type
    return b"\x04" + bytes([len(body)]) + body


def zmtp_frame(body: bytes, more: bool) -> bytes:
    flags = 1 if more else 0
    if len(body) > 255:
        return bytes([flags | 2]) + _struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def recv_exactly(sock: _socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed during the ZMTP handshake")
        data += chunk
    return bytes(data)


def zmtp_handshake(sock: _socket.socket, socket_type: bytes) -> None:
    sock.sendall(ZMTP_GREETING + _zmtp_ready(socket_type))
    greeting = recv_exactly(sock, 64)
    if greeting[0] != 0xFF or greeting[10] < 3:
        raise ConnectionError(f"not a ZMTP 3 peer: {greeting[:12]!r}")
    flags = recv_exactly(sock, 1)[0]
    size = recv_exactly(sock, 1)[0] if not flags & 2 else _struct.unpack(">Q", recv_exactly(sock, 8))[0]
    recv_exactly(sock, size)  # the peer's READY command


def run_raw_sender(profile: str, port: int, rate: float = 0.0) -> None:
    """Serve one PULL peer on 127.0.0.1:port with the profile forever, as a PUSH would (rate 0: flat out)."""
    template = profile_message(profile)
    headers = HeaderFactory(template[0])
    tail = b"".join(zmtp_frame(part, i < len(template) - 2) for i, part in enumerate(template[1:]))
    server = _socket.socket()
    server.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("READY", flush=True)
    conn, _ = server.accept()
    conn.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    zmtp_handshake(conn, b"PUSH")
    pulse_id = FIRST_PULSE_ID
    start = time.time()
    interval = 1.0 / rate if rate else 0.0
    try:
        while True:
            header = zmtp_frame(headers(pulse_id, time.time()), True)
            conn.sendmsg([header, tail])  # blocking socket: sends everything (or raises)
            pulse_id += 1
            if interval:
                delay = start + (pulse_id - FIRST_PULSE_ID) * interval - time.time()
                if delay > 0:
                    time.sleep(delay)
    except (BrokenPipeError, ConnectionResetError):
        return


class RawConsumer:
    """The PULL end as a raw TCP client of a bound PUSH: counts messages, walks frame headers only."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = _socket.create_connection(("127.0.0.1", port), timeout=timeout)
        zmtp_handshake(self.sock, b"PULL")
        self.buffer = bytearray(4 * 1024 * 1024)
        self.view = memoryview(self.buffer)
        self.start = 0
        self.end = 0
        self.parts = 0

    def _fill(self, n: int) -> None:
        """Make at least n bytes available at self.start."""
        if self.end - self.start >= n:
            return
        if self.start:
            remaining = self.end - self.start
            self.buffer[:remaining] = self.buffer[self.start:self.end]
            self.start, self.end = 0, remaining
        while self.end < n:
            got = self.sock.recv_into(self.view[self.end:])
            if not got:
                raise ConnectionError("producer closed")
            self.end += got

    def receive(self, timeout: float) -> bool:
        """Consume one whole multipart message; False on timeout."""
        self.sock.settimeout(timeout)
        try:
            more = True
            while more:
                self._fill(2)
                flags = self.buffer[self.start]
                if flags & 2:
                    self._fill(9)
                    size = _struct.unpack_from(">Q", self.buffer, self.start + 1)[0]
                    self.start += 9
                else:
                    size = self.buffer[self.start + 1]
                    self.start += 2
                more = bool(flags & 1)
                self.parts += 1
                available = self.end - self.start
                if size <= available:
                    self.start += size
                else:  # skip a large body without keeping it
                    size -= available
                    self.start = self.end = 0
                    while size:
                        got = self.sock.recv_into(self.view, min(size, len(self.buffer)))
                        if not got:
                            raise ConnectionError("producer closed")
                        size -= got
            return True
        except _socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


class CompiledConsumer:
    """The PULL end through the compiled whole-message receive (transport.partsio): one C call per message.

    The raw consumer walks every frame header in Python; at 1000-4000 parts a
    message that costs more than the middle being measured.
    """

    def __init__(self, port: int) -> None:
        import zmq

        from sf_bsread_writer.transport import partsio

        if "compiled" not in partsio.AVAILABLE:
            raise RuntimeError(f"the compiled consumer needs the extension: {partsio.FALLBACK_REASON}")
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, 50)
        self.socket.connect(f"tcp://127.0.0.1:{port}")
        self.receiver = partsio.PartsReceiver(implementation="compiled")

    def receive(self, timeout: float) -> bool:
        if not self.socket.poll(int(timeout * 1000)):
            return False
        self.receiver.receive(self.socket)
        return True

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


def consumer_for(port: int):
    """The fastest consumer available: compiled where the extension is built, raw ZMTP otherwise."""
    try:
        return CompiledConsumer(port)
    except RuntimeError:
        return RawConsumer(port)


class OriginalPatternWriter:
    """The original writer's HDF5 pattern, the baseline of the writer benchmarks.

    As the original (writer_format.BsreadH5Writer via bsread's h5 Writer) did:
    per message and channel, grow data / pulse_id / is_data_present by one
    row and write one element into each; chunks of 100 rows, no compression.
    Scalars only (that is what the benchmarks feed it).
    """

    def __init__(self, file: Any) -> None:
        self.file = file  # an open h5py.File
        self.datasets: dict[str, tuple[Any, Any, Any]] = {}
        self.row = 0

    def append(self, message: Any) -> None:
        row = self.row
        for index, spec in enumerate(message.data_header.channels):
            if spec.name not in self.datasets:
                group = self.file.create_group(f"data/{spec.name}")
                self.datasets[spec.name] = (
                    group.create_dataset("data", (0, 1), maxshape=(None, 1), chunks=(100, 1), dtype=spec.dtype),
                    group.create_dataset("pulse_id", (0,), maxshape=(None,), chunks=(100,), dtype="i8"),
                    group.create_dataset("is_data_present", (0,), maxshape=(None,), chunks=(100,), dtype="u1"))
            data, pulse_id, present = self.datasets[spec.name]
            value = message.value(index)
            for dataset in (data, pulse_id, present):
                dataset.resize(row + 1, axis=0)
            data[row] = value
            pulse_id[row] = message.pulse_id
            present[row] = 1
        self.row += 1
