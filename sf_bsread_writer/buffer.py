"""``sf_bsread_buffer``: ingest one bsread stream, keep it in a ring, serve it live and replayed.

This module is the I/O shell. One thread (the one calling :meth:`Buffer.run`)
owns every ZeroMQ socket and the ring:

- **ingest** (PULL or SUB, connecting to the source): drained first, up to
  a batch per loop, so nothing downstream can starve it. Each message is
  validated by ``protocol.MessageParser`` (main header, data header by hash,
  part count, size), stored as its raw frames in ``ring.Ring``, then handed
  to the live output. Rejected messages are counted by reason and dropped.
- **live output** (PUB, or PUSH for a legacy single consumer): never blocks.
- **replay** (ROUTER): one ``replay.ReplaySession`` per writer, served
  round-robin with a bounded amount of work per loop; the sessions are pure
  and decide what to send (docs/replay-protocol.md).
- **HTTP** (Bottle on ``httpserver.HttpServer``, its own threads): answers
  from an immutable statistics snapshot that the loop publishes a few times
  a second; the HTTP threads never touch the ring or a socket.

On start it prints one machine-readable line to stdout,
``READY {"output": ..., "replay": ..., "rest": ..., "stream": ...}``, and
tells systemd (``Type=notify``) READY=1, then pings the watchdog.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import bottle
import zmq

from . import config, status
from .httpserver import HttpServer
from .protocol import IgnoredMessage, MessageParser, ProtocolError
from .replay import (
    Accepted, Close, Data, End, ErrorReason, Gap, Heartbeat, ReplayProtocolError, ReplaySession, Request,
    build_accepted, build_end, build_error, build_gap, build_heartbeat, data_kind,
    parse_writer_message,
)
from .ring import AppendStatus, Ring, tune_allocator

__all__ = ["Buffer", "main", "sd_notify", "make_app"]

logger = logging.getLogger("sf_bsread_writer.buffer")

# Per-part sending of replay data, see Buffer._send_data: plain ints, because
# pyzmq's flag constants are enum members and ``SNDMORE | flags`` builds a new
# enum member per part; and the compiled base-class send, because the
# ``zmq.Socket.send`` wrapper adds Python-level work per call (draft-socket
# routing_id/group handling) that a 1002-part message pays 1002 times.
_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_raw_send = zmq.backend.Socket.send if issubclass(zmq.Socket, zmq.backend.Socket) else zmq.Socket.send

# Receive queue towards the source and send queue of the live output, in
# messages. Small on purpose: with 2.6 MB images, 100 queued messages are
# already 260 MB beside the ring.
INGEST_HWM = 100
OUTPUT_HWM = 100
# Messages per loop: ingest drains up to INGEST_BATCH before replay gets a turn.
INGEST_BATCH = 256
# Ring entries one replay session may look at per pass over the sessions, and in all per pass.
SESSION_BUDGET = 32
REPLAY_BUDGET = 512
# Most time ingest, and then replay, may take per loop turn while the other also has work.
# Why a time slice and not only the message counts above: with a source that
# outruns the buffer, ingest always has a full queue, and a loop turn of up to
# 256 ingested messages against 32 replayed ones gave replay ~1/8 of the loop
# (a 500-channel replay ran at 60 msg/s, docs/performance.md). Equal slices
# give each side at least half of the loop when both are busy; each takes less
# when it has less to do, so at production rates (a 100 Hz scalar stream costs
# ingest ~40% of the loop) ingest never falls behind and replay gets the rest.
# 20 ms of ingest delay is 2 messages at 100 Hz, well within INGEST_HWM.
LOOP_SLICE_SECONDS = 0.02
# Parts below this are copied on send by the ROUTER (pyzmq's copy_threshold).
# pyzmq's default (64 KiB) sends a larger bytes part, e.g. the ~70 kB data
# header of a 500-channel stream that the ring keeps as bytes, zero-copy: a
# Python-side zmq.Frame plus a round trip through pyzmq's garbage-collector
# thread on every send, far dearer than copying 70 kB. zmq.Frame parts (the
# large parts the ring keeps as received: images) are always sent by
# reference, whatever this says.
REPLAY_COPY_THRESHOLD = 1024 * 1024
REPLAY_REQUEST_BATCH = 256
# Messages queued to the CA gateway; it wants only the newest, so a slow gateway loses old ones.
CA_FEED_HWM = 4
# The ROUTER never holds more than window + a few control messages per writer.
REPLAY_SNDHWM = 100_000
# Longest sleep of the loop when idle (bounds the reaction to stop()).
IDLE_POLL_MS = 100
RATE_WINDOW_SECONDS = 5.0
REJECT_LOG_INTERVAL = 5.0


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd's notify socket, if there is one.

    The whole sd_notify protocol: one datagram on the unix socket named by
    NOTIFY_SOCKET ("@" means the abstract namespace). Returns False when not
    run under systemd with Type=notify.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as error:
        logger.warning("sd_notify(%r) failed: %s", state, error)
        return False


def _watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WATCHDOG_USEC), or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(0.05, int(usec) / 2e6)
    except ValueError:
        return None


def _json_error(status_code: int, message: str) -> str:
    bottle.response.status = status_code
    bottle.response.content_type = "application/json"
    return json.dumps({"state": "error", "status": message})


def make_app(get_snapshot: Callable[[], dict[str, Any]]) -> bottle.Bottle:
    """The HTTP API; ``get_snapshot`` returns the latest published statistics snapshot."""
    app = bottle.Bottle()

    @app.get("/status")
    def _status() -> dict[str, Any]:
        return status.status_answer(get_snapshot())

    @app.get("/statistics")
    def _statistics() -> dict[str, Any]:
        return status.statistics_answer(get_snapshot())

    @app.get("/metrics")
    def _metrics() -> str:
        bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        return status.prometheus_text(get_snapshot())

    @app.error(404)
    def _not_found(error: bottle.HTTPError) -> str:
        return _json_error(404, f"not found: {bottle.request.path} (GET /status, /statistics, /metrics)")

    @app.error(405)
    def _not_allowed(error: bottle.HTTPError) -> str:
        return _json_error(405, f"method {bottle.request.method} not allowed on {bottle.request.path}")

    @app.error(500)
    def _internal(error: bottle.HTTPError) -> str:
        logger.error("HTTP %s %s failed: %s", bottle.request.method, bottle.request.path, error.exception)
        return _json_error(500, f"internal error: {error.exception}")

    return app


class _RateLimitedLog:
    """Log a repeated warning at most once per interval and key, saying how many were suppressed."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self.interval:
            suppressed = self._suppressed.pop(key, 0)
            suffix = f" ({suppressed} more like this suppressed)" if suppressed else ""
            logger.warning(message + suffix, *args)
            self._last[key] = now
        else:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1


def _frames_nbytes(frames: Sequence[Any]) -> int:
    return sum(len(frame) for frame in frames)


class Buffer:
    """The buffer service, usable in-process (tests) or via :func:`main`.

    Construct with keyword arguments named like the CLI options (see
    ``config.BUFFER_OPTIONS``) or with :meth:`from_args`; call :meth:`run`
    (blocks until :meth:`stop`; any thread, but sockets stay in that
    thread). ``started`` is set once every endpoint is bound; then
    ``output_address``, ``replay_address`` and ``rest_url`` hold the
    actual endpoints (port 0 = any free port). :meth:`statistics` returns
    the latest published snapshot (safe from any thread).
    """

    def __init__(self, stream: str, output_port: int = 0, buffer_length: int = 1000,
                 buffer_bytes: int = 2 * 1024**3, max_message_bytes: int = config.DEFAULT_MAX_MESSAGE_BYTES,
                 source_mode: str = "pull", output_mode: str = "pub", replay_port: int = 0,
                 rest_port: int | None = 0, bind: str = config.DEFAULT_BIND, name: str = "BSBUFFER",
                 analyzer: bool = False, ca: bool = False, ca_prefix: str = "", ca_max_rate: float = 10.0,
                 session_timeout: float = 10.0, heartbeat_interval: float = 1.0,
                 snapshot_interval: float = 0.25, print_ready: bool = False, log_level: str = "INFO",
                 **ignored: Any) -> None:
        if source_mode not in ("pull", "sub"):
            raise ValueError(f"source_mode must be pull or sub, not {source_mode!r}")
        if output_mode not in ("pub", "push"):
            raise ValueError(f"output_mode must be pub or push, not {output_mode!r}")
        if buffer_length < 1 or buffer_bytes < 1:
            raise ValueError("buffer_length and buffer_bytes must be positive")
        self.stream = stream
        self.output_port = output_port
        self.source_mode = source_mode
        self.output_mode = output_mode
        self.replay_port = replay_port
        self.rest_port = rest_port
        self.bind = bind
        self.name = name
        self.analyzer = analyzer
        self.ca = ca
        self.ca_prefix = ca_prefix
        if ca and ca_max_rate <= 0:
            raise ValueError("ca_max_rate must be positive")
        self.ca_max_rate = ca_max_rate
        self._ca_feed: zmq.Socket | None = None  # --ca: loopback PUB to the gateway, ca_max_rate msg/s
        self._ca_feed_address: str | None = None
        self._ca_next_feed = 0.0
        self._ca_fed = 0
        self.session_timeout = session_timeout
        self.heartbeat_interval = heartbeat_interval
        self.snapshot_interval = snapshot_interval
        self.print_ready = print_ready
        self.log_level = log_level
        self.max_messages = buffer_length
        self.max_bytes = buffer_bytes

        self.ring = Ring(buffer_length, buffer_bytes)  # owned by the loop thread
        self._parser = MessageParser(max_message_bytes)
        self.started = threading.Event()
        self.stopped = threading.Event()
        self._stop_requested = threading.Event()
        self.output_address: str | None = None
        self.replay_address: str | None = None
        self.rest_url: str | None = None

        # Counters (loop thread only; published through snapshots).
        self._start_monotonic = time.monotonic()
        self._received = 0
        self._received_bytes = 0
        self._forwarded = 0
        self._output_drops = 0
        self._rejected: dict[str, int] = {}
        self._ignored = 0
        self._duplicates = 0
        self._header_changes = 0
        self._last_hash: str | None = None
        self._last_pulse_id: int | None = None
        self._last_message_monotonic: float | None = None
        self._last_message_time: float | None = None
        self._sessions: dict[bytes, ReplaySession] = {}
        self._replay_totals = {"started": 0, "ended": 0, "expired": 0, "refused": 0, "disconnected": 0,
                               "send_failures": 0, "sent": 0, "gaps": 0, "lost": 0}
        self._round_robin = 0
        self._rates: deque[tuple[float, int, int]] = deque()
        self._reject_log = _RateLimitedLog(REJECT_LOG_INTERVAL)
        self._snapshot_lock = threading.Lock()
        self._snapshot: dict[str, Any] = {}
        self._gateway: Any = None  # gateway.GatewaySupervisor with --ca
        self._publish_snapshot(time.monotonic())

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> "Buffer":
        """Build from an argparse namespace of ``config.BUFFER_OPTIONS``."""
        return cls(**{**vars(args), **overrides})

    # -- public, thread-safe ----------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish (returns at once; the loop exits within ~0.1 s)."""
        self._stop_requested.set()

    def statistics(self) -> dict[str, Any]:
        """The latest published snapshot (immutable by convention: never modify it)."""
        with self._snapshot_lock:
            return self._snapshot

    # -- main loop ----------------------------------------------------------
    def run(self) -> None:
        """Bind, announce readiness, loop until stop(), then close everything."""
        context = zmq.Context()
        http: HttpServer | None = None
        sockets: list[zmq.Socket] = []
        try:
            ingest = context.socket(zmq.SUB if self.source_mode == "sub" else zmq.PULL)
            sockets.append(ingest)
            ingest.setsockopt(zmq.RCVHWM, INGEST_HWM)
            ingest.setsockopt(zmq.LINGER, 0)
            if self.source_mode == "sub":
                ingest.setsockopt(zmq.SUBSCRIBE, b"")
            ingest.connect(self.stream)

            output = context.socket(zmq.PUSH if self.output_mode == "push" else zmq.PUB)
            sockets.append(output)
            output.setsockopt(zmq.SNDHWM, OUTPUT_HWM)
            output.setsockopt(zmq.LINGER, 0)
            output.bind(f"tcp://{self.bind}:{self.output_port}")
            self.output_address = output.getsockopt_string(zmq.LAST_ENDPOINT)

            router = context.socket(zmq.ROUTER)
            sockets.append(router)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished writer raises instead of dropping
            router.setsockopt(zmq.SNDHWM, REPLAY_SNDHWM)
            router.setsockopt(zmq.LINGER, 0)
            router.copy_threshold = REPLAY_COPY_THRESHOLD
            router.bind(f"tcp://{self.bind}:{self.replay_port}")
            self.replay_address = router.getsockopt_string(zmq.LAST_ENDPOINT)

            if self.ca:
                # The gateway's own feed, not the live output: PVs update at most ca_max_rate times a
                # second, so the gateway need not ingest (and the buffer need not send) every message,
                # and a PUSH live output keeps all its messages for its one legacy consumer.
                self._ca_feed = context.socket(zmq.PUB)
                sockets.append(self._ca_feed)
                self._ca_feed.setsockopt(zmq.SNDHWM, CA_FEED_HWM)
                self._ca_feed.setsockopt(zmq.LINGER, 0)
                self._ca_feed.bind("tcp://127.0.0.1:0")  # the gateway is our own child: loopback only
                self._ca_feed_address = self._ca_feed.getsockopt_string(zmq.LAST_ENDPOINT)

            if self.rest_port is not None:
                http = HttpServer(make_app(self.statistics), self.bind, self.rest_port).start()
                self.rest_url = http.url

            self._tune_allocator()
            self._announce_ready()
            self._start_gateway()
            self._loop(ingest, output, router)
        finally:
            sd_notify("STOPPING=1")
            self._stop_gateway()
            if http is not None:
                http.stop()
            for sock in sockets:
                sock.close(linger=0)
            context.term()
            self._sessions.clear()
            self.started.set()  # release anybody waiting even if binding failed
            self.stopped.set()
            logger.info("buffer %s stopped", self.name)

    def _tune_allocator(self) -> None:
        try:
            tune_allocator()
        except Exception as error:  # tuning is an optimisation, never a reason not to run
            logger.warning("allocator tuning failed: %s", error)

    def _announce_ready(self) -> None:
        endpoints = {"stream": self.stream, "output": self.output_address, "replay": self.replay_address,
                     "rest": self.rest_url}
        logger.info("buffer %s: ingesting %s (%s), live output %s (%s), replay %s, HTTP %s",
                    self.name, self.stream, self.source_mode, self.output_address, self.output_mode,
                    self.replay_address, self.rest_url)
        self._publish_snapshot(time.monotonic())
        if self.print_ready:
            print("READY " + json.dumps(endpoints), flush=True)
        sd_notify(f"READY=1\nSTATUS=ingesting {self.stream}")
        self.started.set()

    def _loop(self, ingest: zmq.Socket, output: zmq.Socket, router: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(ingest, zmq.POLLIN)
        poller.register(router, zmq.POLLIN)
        watchdog = _watchdog_interval()
        next_watchdog = time.monotonic()
        next_snapshot = time.monotonic()
        busy = False
        while not self._stop_requested.is_set():
            poller.poll(0 if busy else IDLE_POLL_MS)
            self._drain_ingest(ingest, output, time.monotonic() + LOOP_SLICE_SECONDS)
            busy = self._serve_replay(router, time.monotonic() + LOOP_SLICE_SECONDS)
            now = time.monotonic()
            if now >= next_snapshot:
                self._expire_sessions(now)
                self._publish_snapshot(now)
                next_snapshot = now + self.snapshot_interval
            if watchdog is not None and now >= next_watchdog:
                sd_notify("WATCHDOG=1")
                next_watchdog = now + watchdog
        self._publish_snapshot(time.monotonic(), state="stopping")

    # -- ingest -------------------------------------------------------------
    def _drain_ingest(self, ingest: zmq.Socket, output: zmq.Socket, deadline: float) -> None:
        """Ingest what is queued: up to INGEST_BATCH messages, until ``deadline`` (time.monotonic)."""
        for _ in range(INGEST_BATCH):
            try:
                frames = ingest.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._ingest(frames, output)
            if time.monotonic() >= deadline:
                return

    def _ingest(self, frames: list[zmq.Frame], output: zmq.Socket) -> None:
        self._last_message_monotonic = time.monotonic()
        try:
            message = self._parser.parse(frames)
        except IgnoredMessage as ignored:
            self._ignored += 1
            if self.analyzer:
                logger.info("analyzer: control message %s ignored", getattr(ignored, "htype", ignored))
            return
        except ProtocolError as error:
            reason = getattr(error.reason, "value", str(error.reason))
            self._rejected[reason] = self._rejected.get(reason, 0) + 1
            self._reject_log.warning(reason, "rejected message (%s): %s", reason, error.detail)
            return
        except Exception as error:  # a parser bug must cost one message, not the service
            reason = "parser_error"
            self._rejected[reason] = self._rejected.get(reason, 0) + 1
            self._reject_log.warning(reason, "message dropped, the parser failed: %r", error)
            return
        pulse_id = message.pulse_id
        timestamp = message.timestamp
        self._analyze(message, pulse_id)
        result = self.ring.append(pulse_id, timestamp, frames)
        if result.status is AppendStatus.HELD_BACK:
            # The ring waits for the next messages to tell a source restart from a stray message
            # (ring.py); the live output is a relay and passes it on now.
            logger.info("pulse id %d is below the newest held (%s): held back from the ring until confirmed",
                        pulse_id, self.ring.newest_pulse_id)
        elif result.status is not AppendStatus.STORED:
            if result.status is AppendStatus.DUPLICATE:
                self._duplicates += 1
                self._reject_log.warning("duplicate", "message with repeated pulse id %d dropped", pulse_id)
            else:  # larger than the whole ring (--buffer-bytes)
                reason = "larger_than_ring"
                self._rejected[reason] = self._rejected.get(reason, 0) + 1
            return
        if self.analyzer and result.skipped_pulses:
            logger.info("analyzer: pulse id jumped to %d, %d pulses skipped (usual step %s)",
                        pulse_id, result.skipped_pulses, self.ring.usual_step)
        if result.reset_evicted:
            logger.info("pulse ids restarted at %d: %d newer messages dropped from the ring",
                        pulse_id, result.reset_evicted)
        self._received += 1
        self._received_bytes += message.nbytes
        self._last_message_time = timestamp
        self._forward(frames, output)
        if self._ca_feed is not None:
            self._feed_gateway(frames, self._last_message_monotonic)

    def _feed_gateway(self, frames: list[zmq.Frame], now: float) -> None:
        """--ca: at most ca_max_rate messages a second to the gateway (PUB: never blocks).

        Feeds keep to a grid of 1/ca_max_rate with half an interval of
        tolerance: a source at exactly the limit (100 Hz, --ca-max-rate 100)
        arrives with jitter, and timing each feed from the previous arrival
        would skip every message that comes a little early. Each feed moves
        the grid on by a whole interval, so the average never exceeds the limit.
        """
        interval = 1.0 / self.ca_max_rate
        if now + interval / 2 < self._ca_next_feed:
            return
        self._ca_next_feed = max(self._ca_next_feed, now - interval / 2) + interval
        self._ca_feed.send_multipart(frames, copy=False)
        self._ca_fed += 1

    def _forward(self, frames: list[zmq.Frame], output: zmq.Socket) -> None:
        """Live output; never blocks. Non-blocking applies to the first part only (bsread-format.md)."""
        try:
            output.send(frames[0], zmq.SNDMORE | zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._output_drops += 1  # PUSH without a peer or at its high-water mark
            return
        output.send_multipart(frames[1:], copy=False)
        self._forwarded += 1

    def _analyze(self, message: Any, pulse_id: int) -> None:
        """Count (and with --analyzer log) header changes; jumps and resets are counted by the ring."""
        header_hash = message.main.hash
        if header_hash != self._last_hash:
            if self._last_hash is not None:
                self._header_changes += 1
                if self.analyzer:
                    logger.info("analyzer: data header changed at pulse %d (hash %s -> %s, %d channels)",
                                pulse_id, self._last_hash, header_hash, message.n_channels)
            self._last_hash = header_hash
        if self._last_pulse_id is not None and pulse_id < self._last_pulse_id and self.analyzer:
            logger.info("analyzer: pulse id went back from %d to %d", self._last_pulse_id, pulse_id)
        self._last_pulse_id = pulse_id

    # -- replay -------------------------------------------------------------
    def _serve_replay(self, router: zmq.Socket, deadline: float) -> bool:
        """Read writer messages and serve sessions until nothing can be sent or ``deadline`` passed.

        Returns True if some session still has something to send (the loop must not sleep).
        Credits are read between passes, so a writer that keeps up is served
        continuously within the slice instead of once per loop turn (one pass
        sends at most SESSION_BUDGET messages to a session).
        """
        while True:
            self._drain_router(router)
            busy = self._serve_sessions(router, time.monotonic())
            if not busy or time.monotonic() >= deadline:
                return busy

    def _drain_router(self, router: zmq.Socket) -> None:
        now = time.monotonic()
        for _ in range(REPLAY_REQUEST_BATCH):
            try:
                parts = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, body = parts[0], parts[1:]
            session = self._sessions.get(identity)
            try:
                message = parse_writer_message(body)
            except ReplayProtocolError as error:
                self._replay_totals["refused"] += 1
                logger.warning("replay: malformed message from %s: %s", identity.hex(), error)
                self._send_control(router, identity, build_error(error.reason, error.detail))
                continue
            if isinstance(message, Request):
                if session is not None:
                    self._retire(identity, session)
                session = ReplaySession(identity.hex(), message, self.ring, now, self.heartbeat_interval)
                self._sessions[identity] = session
                self._replay_totals["started"] += 1
                logger.info("replay: session %s: start pulse %s / time %s, stop pulse %s / time %s, window %d",
                            session.session_id, message.start_pulse_id, message.start_time,
                            message.stop_pulse_id, message.stop_time, session.window)
                self._send_control(router, identity, build_accepted(Accepted(
                    session.window, self.ring.oldest_pulse_id, self.ring.newest_pulse_id)))
            elif session is None:
                if not isinstance(message, Close):
                    self._send_control(router, identity, build_error(
                        ErrorReason.UNKNOWN_SESSION, "no session for this writer: send a request first"))
            elif isinstance(message, Close):
                logger.info("replay: session %s closed by the writer", session.session_id)
                self._retire(identity, session)
            else:
                session.on_message(message, now)

    def _send_control(self, router: zmq.Socket, identity: bytes, frames: list[bytes]) -> bool:
        try:
            router.send_multipart([identity, *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as error:  # Again (HWM) or EHOSTUNREACH (writer gone)
            logger.debug("replay: cannot send to %s: %s", identity.hex(), error)
            return False

    def _send_event(self, router: zmq.Socket, identity: bytes, event: Any) -> bool:
        if isinstance(event, Data):
            return self._send_data(router, identity, event)
        if isinstance(event, Gap):
            frames = build_gap(event)
        elif isinstance(event, End):
            frames = build_end(event)
        elif isinstance(event, Heartbeat):
            frames = build_heartbeat(event)
        else:  # pragma: no cover - sessions produce nothing else
            raise TypeError(f"unexpected replay event {event!r}")
        try:
            # Non-blocking on the identity frame: once accepted the rest cannot block.
            router.send(identity, zmq.SNDMORE | zmq.NOBLOCK)
        except zmq.ZMQError as error:
            return self._send_failed(identity, error)
        router.send_multipart(frames, copy=False)
        return True

    def _send_data(self, router: zmq.Socket, identity: bytes, event: Data) -> bool:
        """Send one data message: identity, kind frame, then the original frames (as ``build_data``).

        The hot path of a replay: a 500-channel message has 1002 parts, and
        ``send_multipart`` costs ~2.5 us of Python per part (a type check
        per part, then the ``zmq.Socket.send`` wrapper and an enum ``|``).
        This loop sends the same parts, in the same order, with the same
        flags, ~4x cheaper (numbers in docs/performance.md). Parts below
        the ROUTER's copy_threshold (memoryviews into the ring, the data
        header) are copied into the outgoing message; zmq.Frame parts go by reference.
        """
        send = _raw_send
        try:
            # Non-blocking on the identity frame: once accepted the rest cannot block.
            send(router, identity, _SNDMORE | _NOBLOCK)
        except zmq.ZMQError as error:
            return self._send_failed(identity, error)
        frames = event.frames
        send(router, data_kind(event.pulse_id), _SNDMORE if frames else 0)
        if frames:
            for part in frames[:-1]:
                send(router, part, _SNDMORE, False)
            send(router, frames[-1], 0, False)
        return True

    def _send_failed(self, identity: bytes, error: zmq.ZMQError) -> bool:
        session = self._sessions.get(identity)
        if error.errno == zmq.EHOSTUNREACH:
            self._replay_totals["disconnected"] += 1
            logger.info("replay: writer of session %s disconnected", identity.hex())
        else:
            # Cannot happen while the writer respects its window; the session ends and the
            # writer (BufferLost after its peer timeout) re-requests from where it was.
            self._replay_totals["send_failures"] += 1
            logger.error("replay: cannot send to session %s (%s); dropping the session", identity.hex(), error)
        if session is not None:
            self._retire(identity, session)
        return False

    def _serve_sessions(self, router: zmq.Socket, now: float) -> bool:
        """Round-robin over sessions with a bounded budget; True if some session has more to send."""
        if not self._sessions:
            return False
        identities = list(self._sessions)
        start = self._round_robin % len(identities)
        self._round_robin += 1
        budget = REPLAY_BUDGET
        busy = False
        for identity in identities[start:] + identities[:start]:
            session = self._sessions.get(identity)
            if session is None:
                continue
            if budget <= 0:
                busy = busy or session.has_work(self.ring)
                continue
            before = session.sent
            for event in session.poll(self.ring, now, min(SESSION_BUDGET, budget)):
                if not self._send_event(router, identity, event):
                    break
            budget -= max(1, session.sent - before)
            if session.ended is not None:
                logger.info("replay: session %s ended (%s) after %d messages, last pulse %s",
                            session.session_id, session.ended.reason, session.sent, session.ended.last_pulse_id)
                self._replay_totals["ended"] += 1
                self._retire(identity, session)
            elif identity in self._sessions and session.has_work(self.ring):
                busy = True
        return busy

    def _retire(self, identity: bytes, session: ReplaySession) -> None:
        if self._sessions.get(identity) is session:
            del self._sessions[identity]
            self._replay_totals["sent"] += session.sent
            self._replay_totals["gaps"] += session.gaps
            self._replay_totals["lost"] += session.lost

    def _expire_sessions(self, now: float) -> None:
        for identity, session in list(self._sessions.items()):
            if session.expired(now, self.session_timeout):
                logger.warning("replay: session %s expired (writer silent for %.1f s)",
                               session.session_id, now - session.last_heard)
                self._replay_totals["expired"] += 1
                self._retire(identity, session)

    # -- statistics ---------------------------------------------------------
    def _publish_snapshot(self, now: float, state: str = "running") -> None:
        ring = self.ring
        counters = ring.counters

        def counter(name: str) -> int:
            return int(getattr(counters, name))

        self._rates.append((now, self._received, self._received_bytes))
        while len(self._rates) > 2 and now - self._rates[0][0] > RATE_WINDOW_SECONDS:
            self._rates.popleft()
        first_time, first_received, first_bytes = self._rates[0]
        span = now - first_time
        sessions = [session.position() for session in self._sessions.values()]
        totals = dict(self._replay_totals)
        for session in self._sessions.values():
            totals["sent"] += session.sent
            totals["gaps"] += session.gaps
            totals["lost"] += session.lost
        idle = None if self._last_message_monotonic is None else now - self._last_message_monotonic
        snapshot = {
            "name": self.name,
            "state": state,
            "time": time.time(),
            "uptime_seconds": now - self._start_monotonic,
            "endpoints": {"stream": self.stream, "output": self.output_address, "replay": self.replay_address,
                          "rest": self.rest_url},
            "source": {"address": self.stream, "mode": self.source_mode, "idle_seconds": idle,
                       "last_message_time": self._last_message_time,
                       "connected_once": self._last_message_monotonic is not None},
            "received": self._received,
            "received_bytes": self._received_bytes,
            "forwarded": self._forwarded,
            "output_mode": self.output_mode,
            "output_drops": self._output_drops,
            "rejected": dict(self._rejected),
            "rejected_total": sum(self._rejected.values()),
            "ignored": self._ignored,
            "duplicates": self._duplicates,
            "ca_feed": None if self._ca_feed_address is None else {
                "address": self._ca_feed_address, "max_rate": self.ca_max_rate, "sent": self._ca_fed},
            "header_changes": self._header_changes,
            "ring": {
                "messages": ring.n_messages,
                "bytes": ring.n_bytes,
                "max_messages": self.max_messages,
                "max_bytes": self.max_bytes,
                "oldest_pulse_id": ring.oldest_pulse_id,
                "newest_pulse_id": ring.newest_pulse_id,
                "evicted": counter("evicted"),
                "evicted_bytes": counter("evicted_bytes"),
            },
            "pulse_ids": {
                "last": self._last_pulse_id,
                "usual_step": ring.usual_step,
                "jumps": counter("jumps"),
                "jumped_pulses": counter("jumped_pulses"),
                "resets": counter("resets"),
                "reset_evicted": counter("reset_evicted"),
                "held_back": counter("held_back"),
                "out_of_order": counter("out_of_order"),
            },
            "rates": {
                "messages_per_second": (self._received - first_received) / span if span > 0 else 0.0,
                "bytes_per_second": (self._received_bytes - first_bytes) / span if span > 0 else 0.0,
                "window_seconds": span,
            },
            "replay": {"active_sessions": len(sessions), **totals, "sessions": sessions},
        }
        with self._snapshot_lock:
            self._snapshot = snapshot

    # -- optional CA gateway ------------------------------------------------
    def _start_gateway(self) -> None:
        """--ca: the CA gateway as a supervised child process reading its feed (gateway.py)."""
        if self._ca_feed_address is None:
            return
        from . import gateway  # imported only when asked for: it brings caproto

        self._gateway = gateway.start_process(
            self._ca_feed_address, self.rest_url, self.ca_prefix, self.name, source_mode="sub",
            log_level=self.log_level, extra_args=["--max-rate", repr(self.ca_max_rate)])

    def _stop_gateway(self) -> None:
        if self._gateway is not None:
            self._gateway.stop()
            self._gateway = None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point ``sf_bsread_buffer``; returns the exit code."""
    args = config.parse_args(
        "sf_bsread_buffer",
        "Buffer one bsread stream in a ring; serve it live, replayed to writers and over HTTP.",
        config.BUFFER_OPTIONS, config.BUFFER_ENV_PREFIX, argv,
    )
    config.configure_logging(args.log_level)
    try:
        buffer = Buffer.from_args(args, print_ready=True)
    except ValueError as error:
        logger.error("%s", error)
        return 2

    config.stop_on_signals(buffer.stop)
    try:
        buffer.run()
    except zmq.ZMQError as error:
        logger.error("buffer failed: %s", error)
        return 1
    except OSError as error:  # e.g. HTTP port in use
        logger.error("buffer failed: %s", error)
        return 1
    except Exception:  # a bug: say where, exit non-zero so that systemd restarts us
        logger.exception("buffer failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
