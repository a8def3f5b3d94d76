"""The buffer service: ingest one bsread stream, keep it in a ring, serve it live and replayed.

This module is the I/O shell around the pure ring (``core.ring``) and the
bsread parser (``core.protocol``). One thread (the one calling
:meth:`Buffer.run`) owns every ZeroMQ socket and the ring:

- **ingest** (PULL or SUB, connecting to the source): drained first, up to
  a batch per loop, so nothing downstream can starve it. Each message is
  validated by ``MessageParser`` (main header, data header by hash, part
  count, size), stored as its raw frames in the ring, then handed to the
  live output. Rejected messages are counted by reason and dropped.
- **live output** (PUB, or PUSH for a legacy single consumer): never blocks.
- **replay** (``buffer.replay_endpoint``): one pure ``ReplaySession`` per
  writer, served round-robin with a bounded amount of work per loop.
- **HTTP** (``buffer.http_app`` on ``httpserver.HttpServer``, its own
  threads): answers from an immutable, typed status snapshot
  (``core.status.BufferStatus``) that the loop publishes a few times a
  second; the HTTP threads never touch the ring or a socket.
- **--ca**: a rate-limited loopback feed for the CA gateway, a child
  process supervised by ``ca.supervisor``.

On start it prints the READY line (``process.print_ready``) with its
endpoints and tells systemd READY=1, then pings the watchdog.
"""
from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from argparse import Namespace
from collections.abc import Callable
from typing import Any

import zmq

from .. import config, process, registry
from ..config import is_loopback
from ..core.parts import PackedParts
from ..core.protocol import DEFAULT_MAX_MESSAGE_BYTES, IgnoredMessage, MessageParser, ProtocolError
from ..core.rates import RateEstimator, SparseAwareGrid
from ..core.ring import AppendStatus, Ring
from ..core.timebase import MAX_CLOCK_SKEW, TimeBase, message_time
from ..core.status import (
    SOURCE_IDLE_SECONDS, BufferStatus, CaFeedStatus, ChildStatus, Endpoints, PulseIdStatus, RateStatus,
    ReplayStatus, RingStatus, SourceStatus,
)
from ..httpserver import HttpServer
from ..transport import partsio
from ..transport.partsio import PartsReceiver, send_parts
from . import children
from ..archive.records import ArchiveTarget
from .archive_link import ArchiveLink
from .http_app import make_app
from .replay_endpoint import ReplayEndpoint

__all__ = ["Buffer"]

logger = logging.getLogger(__name__)

# Receive queue towards the source and send queue of the live output, in
# messages. Small on purpose: with 2.6 MB images, 100 queued messages are
# already 260 MB beside the ring.
INGEST_HWM = 100
OUTPUT_HWM = 100
# Messages per loop: ingest drains up to INGEST_BATCH before replay gets a turn.
INGEST_BATCH = 256
# Most time ingest, and then replay, may take per loop turn while the other also has work.
# Why a time slice and not only message counts: with a source that outruns
# the buffer, ingest always has a full queue, and a loop turn of up to 256
# ingested messages against 32 replayed ones gave replay ~1/8 of the loop
# (a 500-channel replay ran at 60 msg/s, docs/performance.md). Equal slices
# give each side at least half of the loop when both are busy; each takes less
# when it has less to do, so at production rates (a 100 Hz scalar stream costs
# ingest ~40% of the loop) ingest never falls behind and replay gets the rest.
# 20 ms of ingest delay is 2 messages at 100 Hz, well within INGEST_HWM.
LOOP_SLICE_SECONDS = 0.02
# Messages queued to a child's feed (CA gateway, web service); it wants only the newest, so a slow
# child loses old ones.
FEED_HWM = 4
# Longest sleep of the loop when idle (bounds the reaction to stop()).
IDLE_POLL_MS = 100
RATE_WINDOW_SECONDS = 5.0
REJECT_LOG_INTERVAL = 5.0
# systemd's STATUS= line (systemctl status) is refreshed this often.
STATUS_LINE_SECONDS = 5.0
# --analyzer: at most this many "data missing" lines per message (then one line with the count).
ANALYZER_MAX_LINES = 100


class _RateLimitedLog:
    """Log a repeated event at most once per interval and key, saying how many were suppressed."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: Any) -> None:
        self.log(logging.WARNING, key, message, *args)

    def info(self, key: str, message: str, *args: Any) -> None:
        self.log(logging.INFO, key, message, *args)

    def log(self, level: int, key: str, message: str, *args: Any) -> None:
        now = self.clock()
        if now - self._last.get(key, -1e9) >= self.interval:
            suppressed = self._suppressed.pop(key, 0)
            suffix = f" ({suppressed} more like this suppressed)" if suppressed else ""
            logger.log(level, message + suffix, *args)
            self._last[key] = now
        else:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1


class Buffer:
    """The buffer service, usable in-process (tests) or via ``buffer.cli``.

    Construct with keyword arguments named like the CLI options (see
    ``config.BUFFER_OPTIONS``) or with :meth:`from_args`; call :meth:`run`
    (blocks until :meth:`stop`; any thread, but sockets stay in that
    thread). ``started`` is set once every endpoint is bound; then
    ``output_address``, ``replay_address`` and ``rest_url`` hold the
    actual endpoints (port 0 = any free port). :meth:`statistics` returns
    the latest published snapshot (safe from any thread).
    """

    def __init__(self, stream: str, output_port: int = 0, buffer_length: int = 1000,
                 buffer_bytes: int = 2 * 1024**3, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 source_mode: str = "pull", output_mode: str = "pub", replay_port: int = 0,
                 rest_port: int | None = 0, bind: str = config.DEFAULT_BIND, name: str = "BSBUFFER",
                 analyzer: bool = False, ca: bool = False, ca_prefix: str = "", ca_max_rate: float = 10.0,
                 web: bool = False, web_port: int = 8891, web_bind: str = config.DEFAULT_BIND,
                 web_tokens: str | None = None, web_max_rate: float = 10.0,
                 max_writers: int = 16, replay_inflight_bytes: int = 64 * 1024**2,
                 session_timeout: float = 10.0, heartbeat_interval: float = 1.0,
                 snapshot_interval: float = 0.25, print_ready: bool = False, log_level: str = "INFO",
                 register: bool = False, archive: str | None = None, archive_max_bytes: int = -1,
                 archive_max_age: float = 0.0, archive_replicas: int = 1,
                 max_clock_skew: float = MAX_CLOCK_SKEW, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if source_mode not in ("pull", "sub"):
            raise ValueError(f"source_mode must be pull or sub, not {source_mode!r}")
        if output_mode not in ("pub", "push"):
            raise ValueError(f"output_mode must be pub or push, not {output_mode!r}")
        if buffer_length < 1 or buffer_bytes < 1:
            raise ValueError("buffer_length and buffer_bytes must be positive")
        if ca and ca_max_rate <= 0:
            raise ValueError("ca_max_rate must be positive")
        if web and web_max_rate <= 0:
            raise ValueError("web_max_rate must be positive")
        if web and not web_tokens and not is_loopback(web_bind):
            raise ValueError(f"--web-bind {web_bind} reaches other hosts: give --web-tokens FILE (one token per line)")
        if max_writers < 1 or replay_inflight_bytes < 1:
            raise ValueError("max_writers and replay_inflight_bytes must be positive")
        if archive:  # a clear error at the start, not a child that fails forever (docs/archive.md)
            ArchiveTarget.parse(archive, name)
            if archive_replicas < 1:
                raise ValueError("--archive-replicas must be at least 1")
        self.archive = archive
        self.archive_settings = (archive_max_bytes, archive_max_age, archive_replicas)
        self._archive: ArchiveLink | None = None
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
        self.ca_max_rate = ca_max_rate
        self.web = web
        # The buffer listens on the web port itself (run()) and hands the socket to every web service it
        # starts: READY and /statistics name the real port (also for --web-port 0), nobody can take it while a
        # service restarts, and connections that come meanwhile wait in its backlog.
        self.web_port = web_port
        self._web_listener: socket.socket | None = None
        self.web_bind = web_bind
        self.web_tokens = web_tokens
        self.web_max_rate = web_max_rate
        self.max_writers = max_writers
        self.replay_inflight_bytes = replay_inflight_bytes
        self.session_timeout = session_timeout
        self.heartbeat_interval = heartbeat_interval
        self.snapshot_interval = snapshot_interval
        self.print_ready = print_ready
        self.register = register  # list this buffer for sf_bsread_ctl (registry): the CLI does
        self._registry_entry = None
        self.log_level = log_level
        self.max_messages = buffer_length
        self.max_bytes = buffer_bytes
        self.max_clock_skew = max_clock_skew
        self._clock = clock
        self._wall_clock = wall_clock  # the receive time: core.timebase

        self.max_message_bytes = max_message_bytes
        self.ring = Ring(buffer_length, buffer_bytes)  # owned by the loop thread
        self._parser = MessageParser(max_message_bytes)
        self._receiver = PartsReceiver()  # the loop thread's: ingest
        self.started = threading.Event()
        self.stopped = threading.Event()
        self._stop_requested = threading.Event()
        self._reload_requested = threading.Event()
        self.output_address: str | None = None
        self.replay_address: str | None = None
        self.rest_url: str | None = None
        self._replay: ReplayEndpoint | None = None
        self._ca_feed: _LoopbackFeed | None = None  # --ca: the gateway's feed, ca_max_rate msg/s
        self._web_feed: _LoopbackFeed | None = None  # --web: the web service's feed, web_max_rate msg/s
        self._children: dict[str, children.ChildSupervisor] = {}  # ca_gateway, web

        # Counters (loop thread only; published through snapshots).
        self._start_monotonic = clock()
        self._received = 0
        self._received_bytes = 0
        self._forwarded = 0
        self._output_drops = 0
        self._rejected: dict[str, int] = {}
        self._ignored = 0
        self._duplicates = 0
        self._header_changes = 0
        self._last_header: Any = None  # compared with DataHeader.same_as
        self._channels: int | None = None  # of the newest data header
        self._last_pulse_id: int | None = None
        self._last_message_monotonic: float | None = None
        self._previous_message_monotonic: float | None = None
        self._idle_reported = False  # "source idle" logged, "source back" not yet
        self._last_message_time: float | None = None
        self._timed_by_receive = 0
        self._time_base: TimeBase | None = None  # of the last message: a change is logged
        self._clock_offset: float | None = None
        self._rates = RateEstimator(RATE_WINDOW_SECONDS)
        self._next_status_line = 0.0
        self._reject_log = _RateLimitedLog(REJECT_LOG_INTERVAL, clock)
        self._snapshot_lock = threading.Lock()
        self._snapshot: BufferStatus
        self._publish_snapshot(clock())

    @classmethod
    def from_args(cls, args: Namespace, **overrides: Any) -> "Buffer":
        """Build from an argparse namespace of ``config.BUFFER_OPTIONS`` (every option is an argument here)."""
        options = {option.dest: getattr(args, option.dest) for option in config.BUFFER_OPTIONS}
        return cls(**{**options, **overrides})

    # -- public, thread-safe ----------------------------------------------
    def request_reload(self) -> None:
        """SIGHUP: the web service re-reads its token file (the loop forwards it; safe from a signal handler)."""
        self._reload_requested.set()

    def _forward_reload(self) -> None:
        web = self._children.get("web")
        if web is not None and web.send_signal(signal.SIGHUP):
            logger.info("SIGHUP forwarded to the web service (its tokens are re-read)")
        else:
            logger.info("SIGHUP: nothing to reload (no --web)")

    def stop(self) -> None:
        """Ask the loop to finish (returns at once; the loop exits within ~0.1 s)."""
        self._stop_requested.set()

    def statistics(self) -> BufferStatus:
        """The latest published snapshot (frozen)."""
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
            # A part far larger than a message may be (twice the limit) disconnects the source at
            # its header, before libzmq buffers any of it; anything up to that arrives whole and
            # is counted as oversize by the parser.
            ingest.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_message_bytes)
            if self.source_mode == "sub":
                ingest.setsockopt(zmq.SUBSCRIBE, b"")
            ingest.connect(self.stream)

            output = context.socket(zmq.PUSH if self.output_mode == "push" else zmq.PUB)
            sockets.append(output)
            output.setsockopt(zmq.SNDHWM, OUTPUT_HWM)
            output.setsockopt(zmq.LINGER, 0)
            output.bind(f"tcp://{self.bind}:{self.output_port}")
            self.output_address = output.getsockopt_string(zmq.LAST_ENDPOINT)

            self._replay = ReplayEndpoint(context, f"tcp://{self.bind}:{self.replay_port}", self.ring,
                                          self.heartbeat_interval, self.session_timeout, self._clock,
                                          self.max_writers, self.replay_inflight_bytes)
            self.replay_address = self._replay.address
            if self.archive:
                self._archive = ArchiveLink(context, self.archive, self.name, *self.archive_settings)
                sockets.append(self._archive.socket)
                self._replay.archive = ArchiveTarget.parse(self.archive, self.name).url()  # told to every writer

            # Each child's own feed, not the live output: PVs and web clients update at most
            # max_rate times a second, so the child need not ingest (and the buffer need not send)
            # every message, and a PUSH live output keeps all its messages for its legacy consumer.
            if self.ca:
                self._ca_feed = _LoopbackFeed(context, self.ca_max_rate)
                sockets.append(self._ca_feed.socket)
            if self.web:
                self._web_feed = _LoopbackFeed(context, self.web_max_rate)
                sockets.append(self._web_feed.socket)
                self._web_listener = _listen(self.web_bind, self.web_port)
                self.web_port = self._web_listener.getsockname()[1]

            if self.rest_port is not None:
                http = HttpServer(make_app(self.statistics), self.bind, self.rest_port).start()
                self.rest_url = http.url

            self._tune_allocator()
            self._announce_ready()
            self._start_children()
            self._loop(ingest, output, self._replay)
        finally:
            process.sd_notify("STOPPING=1")
            registry.unregister(self._registry_entry)
            self._stop_children()
            if self._web_listener is not None:
                self._web_listener.close()
            if http is not None:
                http.stop()
            if self._replay is not None:
                self._replay.close()
            for sock in sockets:
                sock.close(linger=0)
            context.term()
            self.started.set()  # release anybody waiting even if binding failed
            self.stopped.set()
            logger.info("buffer %s stopped", self.name)

    def _tune_allocator(self) -> None:
        try:
            process.tune_allocator()
        except Exception as error:  # tuning is an optimisation, never a reason not to run
            logger.warning("allocator tuning failed: %s", error)

    def _announce_ready(self) -> None:
        logger.info("buffer %s: ingesting %s (%s), live output %s (%s), replay %s, HTTP %s; message I/O %s%s",
                    self.name, self.stream, self.source_mode, self.output_address, self.output_mode,
                    self.replay_address, self.rest_url, partsio.IMPLEMENTATION,
                    f" ({partsio.FALLBACK_REASON})" if partsio.FALLBACK_REASON else "")
        self._publish_snapshot(self._clock())
        if self.print_ready:
            process.print_ready({**self._endpoints().to_json(), "io_path": partsio.IMPLEMENTATION})
        if self.register:
            self._registry_entry = registry.register("buffer", self.name, self._endpoints().to_json(),
                                                     {"stream": self.stream})
        process.sd_notify(f"READY=1\nSTATUS=ingesting {self.stream}")
        self.started.set()

    def _loop(self, ingest: zmq.Socket, output: zmq.Socket, replay: ReplayEndpoint) -> None:
        poller = zmq.Poller()
        poller.register(ingest, zmq.POLLIN)
        poller.register(replay.socket, zmq.POLLIN)
        clock = self._clock
        watchdog = process.watchdog_interval()
        next_watchdog = clock()
        next_snapshot = clock()
        busy = False
        while not self._stop_requested.is_set():
            poller.poll(0 if busy else IDLE_POLL_MS)
            self._drain_ingest(ingest, output, clock() + LOOP_SLICE_SECONDS)
            busy = replay.serve(clock() + LOOP_SLICE_SECONDS)
            now = clock()
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self._forward_reload()
            if now >= next_snapshot:
                replay.expire(now)
                self._publish_snapshot(now)
                self._report(now)
                next_snapshot = now + self.snapshot_interval
            if watchdog is not None and now >= next_watchdog:
                process.sd_notify("WATCHDOG=1")
                next_watchdog = now + watchdog
        self._publish_snapshot(clock(), state="stopping")

    # -- ingest -------------------------------------------------------------
    def _drain_ingest(self, ingest: zmq.Socket, output: zmq.Socket, deadline: float) -> None:
        """Ingest what is queued: up to INGEST_BATCH messages, until ``deadline`` (the loop's clock)."""
        for _ in range(INGEST_BATCH):
            try:
                frames = self._receiver.receive(ingest, zmq.NOBLOCK)[1]
            except zmq.Again:
                return
            self._ingest(frames, output)
            if self._clock() >= deadline:
                return

    def _ingest(self, frames: PackedParts, output: zmq.Socket) -> None:
        self._previous_message_monotonic = self._last_message_monotonic
        self._last_message_monotonic = self._clock()
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
        received_at = self._wall_clock()
        timestamp, base = message_time(message.timestamp, received_at, self.max_clock_skew)
        self._note_time_base(base, message.timestamp, received_at, pulse_id)
        self._analyze(message, pulse_id)
        result = self.ring.append(pulse_id, timestamp, frames)
        if result.status is AppendStatus.HELD_BACK:
            # The ring waits for the next messages to tell a source restart or a real jump from a
            # stray message (core/ring.py); the live output is a relay and passes it on now.
            where = "below" if pulse_id < (self.ring.newest_pulse_id or 0) else "far above"
            self._reject_log.info("held", "pulse id %d is %s the newest held (%s): held back from the ring until "
                                  "the next messages confirm it", pulse_id, where, self.ring.newest_pulse_id)
        elif result.status is not AppendStatus.STORED:
            if result.status is AppendStatus.DUPLICATE:
                self._duplicates += 1
                self._reject_log.warning("duplicate", "message with repeated pulse id %d dropped", pulse_id)
            else:  # larger than the whole ring (--buffer-bytes)
                reason = "larger_than_ring"
                self._rejected[reason] = self._rejected.get(reason, 0) + 1
            return
        if result.skipped_pulses:
            self._reject_log.info("jump", "pulse id jumped to %d: %d pulses skipped (usual step %s)",
                                  pulse_id, result.skipped_pulses, self.ring.usual_step)
        if result.reset_evicted:
            logger.info("pulse ids restarted at %d: %d newer messages dropped from the ring",
                        pulse_id, result.reset_evicted)
        if self._received == 0:
            logger.info("first message from %s: pulse_id %d, %d channels", self.stream, pulse_id,
                        message.n_channels)
        if self._idle_reported:
            self._idle_reported = False
            logger.info("source back after %.1f s of silence, at pulse_id %d",
                        self._last_message_monotonic - self._previous_message_monotonic, pulse_id)
        self._received += 1
        self._received_bytes += message.nbytes
        self._last_message_time = timestamp
        self._forward(frames, output)
        for feed in (self._ca_feed, self._web_feed):
            if feed is not None:
                feed.offer(frames, self._last_message_monotonic)

    def _forward(self, frames: PackedParts, output: zmq.Socket) -> None:
        """Live output; never blocks. Non-blocking applies to the first part only (bsread-format.md)."""
        try:
            send_parts(output, frames, nonblocking=True)
        except zmq.Again:
            self._output_drops += 1  # PUSH without a peer or at its high-water mark
            return
        self._forwarded += 1

    def _note_time_base(self, base: TimeBase, source_timestamp: float, received_at: float, pulse_id: int) -> None:
        """Count the messages timed by their receive time; log when a source's clock becomes (im)plausible."""
        self._clock_offset = source_timestamp - received_at if source_timestamp > 0 else None
        if base is TimeBase.RECEIVE:
            self._timed_by_receive += 1
        if base is not self._time_base:
            # Rate limited: a source whose clock hovers at the limit would otherwise log every message.
            if base is TimeBase.RECEIVE:
                self._reject_log.warning(
                    "clock", "pulse_id %d: the source's global timestamp %.6f is %s; time windows use the "
                    "buffer's receive time for its messages (--max-clock-skew %g s)", pulse_id, source_timestamp,
                    "absent" if source_timestamp <= 0 else f"{source_timestamp - received_at:+.3f} s off the receive "
                    "time", self.max_clock_skew)
            elif self._time_base is not None:
                self._reject_log.info("clock_back", "pulse_id %d: the source's global timestamp is plausible again",
                                      pulse_id)
            self._time_base = base

    def _analyze(self, message: Any, pulse_id: int) -> None:
        """Count and log header changes; jumps and resets are counted by the ring. --analyzer: absent values."""
        header = message.data_header
        if not header.same_as(self._last_header):
            if self._last_header is not None:
                self._header_changes += 1
                self._reject_log.info("header", "data header changed at pulse %d: %d channels (hash %s -> %s)",
                                      pulse_id, message.n_channels, self._last_header.hash, header.hash)
            self._last_header = header
            self._channels = message.n_channels
        if self._last_pulse_id is not None and pulse_id < self._last_pulse_id and self.analyzer:
            logger.info("analyzer: pulse id went back from %d to %d", self._last_pulse_id, pulse_id)
        self._last_pulse_id = pulse_id
        if self.analyzer:
            self._log_absent_channels(message, pulse_id)

    @staticmethod
    def _log_absent_channels(message: Any, pulse_id: int) -> None:
        """The original analyzer's line per channel without a value (its wording: scripts grep for it).

        At most ``ANALYZER_MAX_LINES`` lines per message, then one line with
        the count, so a stream of thousands of absent channels cannot flood the log.
        """
        absent = [i for i in range(message.n_channels) if not message.is_present(i)]
        names = message.data_header.names
        for i in absent[:ANALYZER_MAX_LINES]:
            logger.info("Channel '%s' data missing in pulse_id %d.", names[i], pulse_id)
        if len(absent) > ANALYZER_MAX_LINES:
            logger.info("... and %d more channels data missing in pulse_id %d.", len(absent) - ANALYZER_MAX_LINES,
                        pulse_id)

    # -- statistics ---------------------------------------------------------
    def _report(self, now: float) -> None:
        """What operators watch: a silent source (once, and when it is back) and systemd's STATUS= line."""
        last = self._last_message_monotonic
        if last is not None and not self._idle_reported and now - last > SOURCE_IDLE_SECONDS:
            self._idle_reported = True
            logger.warning("source %s idle: no message for %.0f s (last pulse_id %s)", self.stream, now - last,
                           self._last_pulse_id)
        if now >= self._next_status_line:
            self._next_status_line = now + STATUS_LINE_SECONDS
            status = self.statistics()
            process.sd_notify(f"STATUS={status.describe()}: {status.rates.messages_per_second:.1f} msg/s, "
                              f"ring {status.ring.messages} messages ({status.ring.oldest_pulse_id}.."
                              f"{status.ring.newest_pulse_id}), {status.replay.active_sessions} writers")

    def _endpoints(self) -> Endpoints:
        host = f"[{self.web_bind}]" if ":" in self.web_bind else self.web_bind  # an IPv6 address in a URL
        web = f"http://{host}:{self.web_port}" if self.web and self.web_port else None
        return Endpoints(stream=self.stream, output=self.output_address, replay=self.replay_address,
                         rest=self.rest_url, web=web)

    def _publish_snapshot(self, now: float, state: str = "running") -> None:
        ring = self.ring
        counters = ring.counters
        self._rates.add(now, self._received, self._received_bytes)
        messages_per_second, bytes_per_second = self._rates.rates() or (0.0, 0.0)
        idle = None if self._last_message_monotonic is None else now - self._last_message_monotonic
        replay = self._replay.status() if self._replay is not None else ReplayStatus(
            active_sessions=0, started=0, ended=0, expired=0, refused=0, disconnected=0, send_failures=0,
            sent=0, gaps=0, lost=0, sessions=())
        snapshot = BufferStatus(
            name=self.name,
            state=state,
            time=time.time(),
            uptime_seconds=now - self._start_monotonic,
            endpoints=self._endpoints(),
            source=SourceStatus(address=self.stream, mode=self.source_mode, idle_seconds=idle,
                                last_message_time=self._last_message_time,
                                connected_once=self._last_message_monotonic is not None,
                                timed_by_receive=self._timed_by_receive, clock_offset_seconds=self._clock_offset),
            received=self._received,
            received_bytes=self._received_bytes,
            forwarded=self._forwarded,
            output_mode=self.output_mode,
            output_drops=self._output_drops,
            rejected=dict(self._rejected),
            rejected_total=sum(self._rejected.values()),
            ignored=self._ignored,
            duplicates=self._duplicates,
            ca_feed=self._ca_feed.status() if self._ca_feed is not None else None,
            web_feed=self._web_feed.status() if self._web_feed is not None else None,
            channels=self._channels,
            children=tuple(ChildStatus(name, child.running, child.restarts) for name, child in self._children.items()),
            archive=self._archive.status(ring) if self._archive is not None else None,
            header_changes=self._header_changes,
            ring=RingStatus(messages=ring.n_messages, bytes=ring.n_bytes, max_messages=self.max_messages,
                            max_bytes=self.max_bytes, oldest_pulse_id=ring.oldest_pulse_id,
                            newest_pulse_id=ring.newest_pulse_id, evicted=counters.evicted,
                            evicted_bytes=counters.evicted_bytes, oldest_time=ring.oldest_time,
                            newest_time=ring.newest_time),
            pulse_ids=PulseIdStatus(last=self._last_pulse_id, usual_step=ring.usual_step, jumps=counters.jumps,
                                    jumped_pulses=counters.jumped_pulses, resets=counters.resets,
                                    reset_evicted=counters.reset_evicted, held_back=counters.held_back,
                                    out_of_order=counters.out_of_order, strays=counters.strays),
            rates=RateStatus(messages_per_second=messages_per_second, bytes_per_second=bytes_per_second,
                             window_seconds=self._rates.span),
            replay=replay,
            io_path=partsio.IMPLEMENTATION,
        )
        with self._snapshot_lock:
            self._snapshot = snapshot

    # -- optional CA gateway ------------------------------------------------
    def _start_children(self) -> None:
        """--ca, --web: the CA gateway and the web service as supervised child processes reading their feeds."""
        if self._ca_feed is not None:
            self._children["ca_gateway"] = (children.start_gateway(
                self._ca_feed.address, self.rest_url, self.ca_prefix, self.name, source_mode="sub",
                log_level=self.log_level, extra_args=["--max-rate", repr(self.ca_max_rate)]))
        if self._web_feed is not None:
            self._children["web"] = (children.start_web(
                self._web_feed.address, self.rest_url, self.replay_address, port=self.web_port, bind=self.web_bind,
                tokens=self.web_tokens, max_rate=self.web_max_rate, log_level=self.log_level,
                listen_fd=self._web_listener.fileno() if self._web_listener is not None else None))

        if self._archive is not None:
            self._children["archiver"] = self._archive.start(self.replay_address, self.log_level)

    def _stop_children(self) -> None:
        for child in self._children.values():
            child.stop()
        self._children.clear()


class _LoopbackFeed:
    """A child's feed: a loopback PUB socket (never blocks) that gets ``max_rate`` messages a second, plus
    those that carry a sparse channel the last one lacked (``core.rates.SparseAwareGrid``)."""

    def __init__(self, context: zmq.Context, max_rate: float) -> None:
        self.max_rate = max_rate
        self.socket = context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, FEED_HWM)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:0")  # our own child reads it: loopback only
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._grid = SparseAwareGrid(max_rate)
        self.sent = 0

    def offer(self, frames: PackedParts, now: float) -> None:
        if self._grid.take(now, frames.layout.presence):
            send_parts(self.socket, frames)
            self.sent += 1

    def status(self) -> CaFeedStatus:
        return CaFeedStatus(address=self.address, max_rate=self.max_rate, sent=self.sent)


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port) for the web service to inherit (``pass_fds``).

    ``host`` may be a name: its first address decides the family (``localhost``
    -> 127.0.0.1 where both families resolve, as ``getaddrinfo`` orders them).
    OSError names host and port.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise OSError(f"cannot listen for --web on {host}:{port}: {error}") from None
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart past TIME_WAIT, as aiohttp does
        listener.bind(address)
        listener.listen(128)
    except OSError as error:
        listener.close()
        raise OSError(error.errno, f"cannot listen for --web on {host}:{port}: {error.strerror}") from None
    return listener
