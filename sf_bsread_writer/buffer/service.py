"""The buffer service: the loop that owns every socket of the buffer and its ring.

One thread (the one calling :meth:`Buffer.run`) owns every ZeroMQ socket
and the ring; the concepts it drives each have their own module:

- **ingest** (PULL or SUB, connecting to the source): drained first, up to
  a batch per loop, so nothing downstream can starve it. What happens to
  each message (validated, timed, analysed, stored, counted) is
  ``buffer.ingest``; the loop forwards what it takes.
- **live output** (PUB, or PUSH for a legacy single consumer): never blocks.
- **replay** (``replay.endpoint``): one pure ``ReplaySession`` per
  writer, served round-robin with a bounded amount of work per loop.
- **status**: the loop publishes a typed snapshot (``buffer.snapshot``) a
  few times a second; the HTTP API (``buffer.http_app`` on
  ``httpserver.HttpServer``, its own threads) answers from it, and the
  feeds carry it to the children.
- **--ca, --web**: a rate-limited loopback feed per child (``buffer.feeds``),
  the children themselves and the web port's socket (``buffer.children``).

On start it prints the READY line (``process.print_ready``) with its
endpoints and tells systemd READY=1, then pings the watchdog. Settings:
one ``BufferSettings`` (``buffer.settings``).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import zmq

from sf_bsread_writer import process, registry
from sf_bsread_writer.archive.records import ArchiveTarget
from sf_bsread_writer.bsread.parts import PackedParts
from sf_bsread_writer.buffer.archive_link import ArchiveLink
from sf_bsread_writer.buffer.children import BufferChildren
from sf_bsread_writer.buffer.feeds import LoopbackFeed
from sf_bsread_writer.buffer.http_app import make_app
from sf_bsread_writer.buffer.ingest import REJECT_LOG_INTERVAL, Ingest, RateLimitedLog
from sf_bsread_writer.buffer.settings import BufferSettings
from sf_bsread_writer.buffer.snapshot import NO_REPLAY, Snapshots
from sf_bsread_writer.httpserver import HttpServer
from sf_bsread_writer.replay.endpoint import ReplayEndpoint
from sf_bsread_writer.ring import Ring
from sf_bsread_writer.status import BufferStatus, Endpoints
from sf_bsread_writer.transport import partsio
from sf_bsread_writer.transport.connection import ConnectionWatch
from sf_bsread_writer.transport.partsio import (
    MessageCutError,
    PartsReceiver,
    bind_again,
    is_cut,
    send_parts,
)

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
# Longest sleep of the loop when idle (bounds the reaction to stop()).
IDLE_POLL_MS = 100


class Buffer:
    """The buffer service, usable in-process (tests) or via ``buffer.cli``.

    Construct with a ``BufferSettings`` (``BufferSettings.from_args`` for the
    command's options) and, for tests, the clocks; call :meth:`run`
    (blocks until :meth:`stop`; any thread, but sockets stay in that
    thread). ``started`` is set once every endpoint is bound; then
    ``output_address``, ``replay_address`` and ``rest_url`` hold the
    actual endpoints (port 0 = any free port). :meth:`statistics` returns
    the latest published snapshot (safe from any thread).
    """

    def __init__(self, settings: BufferSettings, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._archive: ArchiveLink | None = None  # --archive: the archiver child's link (run())
        self._clock = clock
        self._wall_clock = wall_clock  # the receive time (bsread.timebase) and the snapshot's time
        self.ring = Ring(settings.buffer_length, settings.buffer_bytes)  # owned by the loop thread
        self._receiver = PartsReceiver()  # the loop thread's: ingest
        self._reject_log = RateLimitedLog(REJECT_LOG_INTERVAL, clock)
        self.ingest = Ingest(settings.stream, self.ring, self._reject_log,
                             max_message_bytes=settings.max_message_bytes, max_clock_skew=settings.max_clock_skew,
                             analyzer=settings.analyzer)
        self.started = threading.Event()
        self.stopped = threading.Event()
        self._stop_requested = threading.Event()
        self._reload_requested = threading.Event()
        self.output_address: str | None = None
        self.replay_address: str | None = None
        self.rest_url: str | None = None
        self._replay: ReplayEndpoint | None = None
        self._feeds: dict[str, LoopbackFeed | None] = {"ca": None, "web": None}  # ca_max_rate, web_max_rate msg/s
        self._children = BufferChildren(settings)
        self._registry_entry = None
        self._sockets: list[zmq.Socket] = []  # the loop thread's, closed at the end
        self.sockets_replaced: dict[str, int] = {}  # by socket, after a message cut in half (loop thread only)
        self._ingest_connection: ConnectionWatch | None = None
        self.ingest_reconnects = 0  # connections to the source made anew after ZeroMQ gave one up (loop thread)
        self._forwarded = 0  # the live output's counters (loop thread only; published through snapshots)
        self._output_drops = 0
        self._snapshots = Snapshots(settings, clock())
        self._publish_snapshot(clock())

    @property
    def name(self) -> str:
        return self.settings.name

    # -- public, thread-safe ----------------------------------------------
    def request_reload(self) -> None:
        """SIGHUP: the web service re-reads its token file (the loop forwards it; safe from a signal handler)."""
        self._reload_requested.set()

    def stop(self) -> None:
        """Ask the loop to finish (returns at once; the loop exits within ~0.1 s)."""
        self._stop_requested.set()

    def statistics(self) -> BufferStatus:
        """The latest published snapshot (frozen)."""
        return self._snapshots.latest()

    # -- main loop ----------------------------------------------------------
    def run(self) -> None:
        """Bind, announce readiness, loop until stop(), then close everything."""
        settings = self.settings
        context = zmq.Context()
        http: HttpServer | None = None
        sockets: list[zmq.Socket] = []
        self._sockets = sockets
        try:
            ingest = self._open_ingest(context)
            output = self._open_output(context, f"tcp://{settings.bind}:{settings.output_port}")
            self.output_address = output.getsockopt_string(zmq.LAST_ENDPOINT)

            self._replay = ReplayEndpoint(context, f"tcp://{settings.bind}:{settings.replay_port}", self.ring,
                                          settings.heartbeat_interval, settings.session_timeout, self._clock,
                                          settings.max_writers, settings.replay_inflight_bytes)
            self.replay_address = self._replay.address
            if settings.archive:
                self._archive = ArchiveLink(context, settings.archive, settings.name, settings.archive_max_bytes,
                                            settings.archive_max_age, settings.archive_replicas)
                sockets.append(self._archive.socket)
                self._replay.archive = ArchiveTarget.parse(settings.archive, settings.name).url()  # told to writers

            # Each child's own feed, not the live output (buffer.feeds says why); both carry the status.
            if settings.ca:
                self._feeds["ca"] = LoopbackFeed(context, settings.ca_max_rate)
                sockets.append(self._feeds["ca"].socket)
            if settings.web:
                self._feeds["web"] = LoopbackFeed(context, settings.web_max_rate)
                sockets.append(self._feeds["web"].socket)
                self._children.listen_for_web()

            if settings.rest_port is not None:
                http = HttpServer(make_app(self.statistics), settings.bind, settings.rest_port).start()
                self.rest_url = http.url

            self._tune_allocator()
            self._announce_ready()
            self._children.start(*(feed.address if feed is not None else None for feed in
                                   (self._feeds["ca"], self._feeds["web"])), self.replay_address)
            if self._archive is not None:
                self._children.add("archiver", self._archive.start(self.replay_address, settings.log_level))
            self._loop(ingest, output, self._replay)
        finally:
            process.sd_notify("STOPPING=1")
            registry.unregister(self._registry_entry)
            self._children.stop()
            if http is not None:
                http.stop()
            if self._replay is not None:
                self._replay.close()
            if self._ingest_connection is not None:
                self._ingest_connection.close()
            for sock in sockets:
                sock.close(linger=0)
            context.term()
            self.started.set()  # release anybody waiting even if binding failed
            self.stopped.set()
            logger.info("buffer %s stopped", self.name)

    def _open_ingest(self, context: zmq.Context) -> zmq.Socket:
        settings = self.settings
        ingest = context.socket(zmq.SUB if settings.source_mode == "sub" else zmq.PULL)
        self._sockets.append(ingest)
        ingest.setsockopt(zmq.RCVHWM, INGEST_HWM)
        ingest.setsockopt(zmq.LINGER, 0)
        # A part far larger than a message may be (twice the limit) disconnects the source at
        # its header, before libzmq buffers any of it; anything up to that arrives whole and
        # is counted as oversize by the parser. libzmq never connects again after that refusal:
        # the watch does (transport.connection), checked with each snapshot.
        ingest.setsockopt(zmq.MAXMSGSIZE, 2 * settings.max_message_bytes)
        if settings.source_mode == "sub":
            ingest.setsockopt(zmq.SUBSCRIBE, b"")
        self._ingest_connection = ConnectionWatch(ingest, settings.stream, "buffer ingest")
        return ingest

    def _open_output(self, context: zmq.Context, address: str, again: bool = False) -> zmq.Socket:
        output = context.socket(zmq.PUSH if self.settings.output_mode == "push" else zmq.PUB)
        self._sockets.append(output)
        output.setsockopt(zmq.SNDHWM, OUTPUT_HWM)
        output.setsockopt(zmq.LINGER, 0)
        if again:
            bind_again(output, address)
        else:
            output.bind(address)
        return output

    def _replace_cut_sockets(self, ingest: zmq.Socket, output: zmq.Socket, poller: zmq.Poller,
                             error: MessageCutError) -> tuple[zmq.Socket, zmq.Socket]:
        """A message cut in half (transport.partsio) on the ingest, the live output or a feed: each cut socket
        closed and opened again the same way (connected, or bound at the same address: peers reconnect),
        counted (``sockets_replaced``) and logged in one line. What the old socket held is lost."""
        context = ingest.context
        replaced = []
        if is_cut(ingest):
            poller.unregister(ingest)
            if self._ingest_connection is not None:
                self._ingest_connection.close()
            ingest.close(linger=0)
            ingest = self._open_ingest(context)
            poller.register(ingest, zmq.POLLIN)
            replaced.append("ingest")
        if is_cut(output):
            output.close(linger=0)
            output = self._open_output(context, self.output_address, again=True)
            replaced.append("live output")
        for name in replaced:
            self.sockets_replaced[name] = self.sockets_replaced.get(name, 0) + 1
        for name, feed in (("CA feed", self._feeds["ca"]), ("web feed", self._feeds["web"])):
            if feed is not None and is_cut(feed.socket):
                self._replace_feed_socket(name, feed)
                replaced.append(name)
        self._sockets[:] = [sock for sock in self._sockets if not sock.closed]
        logger.error("socket replaced after a message cut in half: %s (so far: %s): %s", ", ".join(replaced) or
                     "none found", self.sockets_replaced, error)
        return ingest, output

    def _replace_feed_socket(self, name: str, feed: LoopbackFeed) -> None:
        """A feed's cut socket closed and bound again at the same address (its child reconnects); counted."""
        context = feed.socket.context
        feed.socket.close(linger=0)
        feed.socket = feed.bound_socket(context, again=True)
        self._sockets.append(feed.socket)
        self._sockets[:] = [sock for sock in self._sockets if not sock.closed]
        self.sockets_replaced[name] = self.sockets_replaced.get(name, 0) + 1

    def _tune_allocator(self) -> None:
        try:
            process.tune_allocator()
        except Exception as error:  # tuning is an optimisation, never a reason not to run
            logger.warning("allocator tuning failed: %s", error)

    def _announce_ready(self) -> None:
        settings = self.settings
        logger.info("buffer %s: ingesting %s (%s), live output %s (%s), replay %s, HTTP %s; message I/O %s%s",
                    self.name, settings.stream, settings.source_mode, self.output_address, settings.output_mode,
                    self.replay_address, self.rest_url, partsio.IMPLEMENTATION,
                    f" ({partsio.FALLBACK_REASON})" if partsio.FALLBACK_REASON else "")
        self._publish_snapshot(self._clock())
        if settings.print_ready:
            process.print_ready({**self._endpoints().to_json(), "io_path": partsio.IMPLEMENTATION})
        if settings.register:
            self._registry_entry = registry.register("buffer", self.name, self._endpoints().to_json(),
                                                     {"stream": settings.stream})
        process.sd_notify(f"READY=1\nSTATUS=ingesting {settings.stream}")
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
        polled_replay = replay.socket
        while not self._stop_requested.is_set():
            poller.poll(0 if busy else IDLE_POLL_MS)
            try:
                self._drain_ingest(ingest, output, clock() + LOOP_SLICE_SECONDS)
            except MessageCutError as error:
                ingest, output = self._replace_cut_sockets(ingest, output, poller, error)
            busy = replay.serve(clock() + LOOP_SLICE_SECONDS)
            if replay.socket is not polled_replay:  # replaced after a message cut in half
                poller.unregister(polled_replay)
                polled_replay = replay.socket
                poller.register(polled_replay, zmq.POLLIN)
            now = clock()
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self._children.forward_reload()
            if now >= next_snapshot:
                replay.expire(now)
                self._publish_snapshot(now, feeds=True)
                self.ingest.check_idle(now)
                if self._ingest_connection is not None and self._ingest_connection.check(now):
                    self.ingest_reconnects += 1
                self._snapshots.status_line(now)
                next_snapshot = now + self.settings.snapshot_interval
            if watchdog is not None and now >= next_watchdog:
                process.sd_notify("WATCHDOG=1")
                next_watchdog = now + watchdog
        self._publish_snapshot(clock(), state="stopping", feeds=True)

    # -- ingest -------------------------------------------------------------
    def _drain_ingest(self, ingest: zmq.Socket, output: zmq.Socket, deadline: float) -> None:
        """Ingest what is queued: up to INGEST_BATCH messages, until ``deadline`` (the loop's clock)."""
        for _ in range(INGEST_BATCH):
            try:
                frames = self._receiver.receive(ingest, zmq.NOBLOCK)[1]
            except zmq.Again:
                return
            now = self._clock()
            if self.ingest.receive(frames, now, self._wall_clock()):
                self._forward(frames, output)
                for feed in self._feeds.values():
                    if feed is not None:
                        feed.offer(frames, now)
            if self._clock() >= deadline:
                return

    def _forward(self, frames: PackedParts, output: zmq.Socket) -> None:
        """Live output; never blocks. Non-blocking applies to the first part only (bsread-format.md)."""
        try:
            send_parts(output, frames, nonblocking=True)
        except zmq.Again:
            self._output_drops += 1  # PUSH without a peer or at its high-water mark
            return
        except MessageCutError:
            self._output_drops += 1  # the loop replaces the socket
            raise
        self._forwarded += 1

    # -- status -------------------------------------------------------------
    def _endpoints(self) -> Endpoints:
        settings = self.settings
        bind = settings.web_bind
        host = f"[{bind}]" if ":" in bind else bind  # an IPv6 address in a URL
        web_port = self._children.web_port
        web = f"http://{host}:{web_port}" if settings.web and web_port else None
        return Endpoints(stream=settings.stream, output=self.output_address, replay=self.replay_address,
                         rest=self.rest_url, web=web)

    def _publish_snapshot(self, now: float, state: str = "running", feeds: bool = False) -> None:
        """A new snapshot for the HTTP API and the STATUS= line; ``feeds``: on the children's feeds too."""
        snapshot = self._snapshots.publish(
            now, time.time(), ingest=self.ingest, ring=self.ring,
            replay=self._replay.status() if self._replay is not None else NO_REPLAY,
            endpoints=self._endpoints(), forwarded=self._forwarded, output_drops=self._output_drops,
            source_reconnects=self.ingest_reconnects, feeds=self._feeds, children=self._children.status(), io_path=partsio.IMPLEMENTATION, state=state,
            archive=self._archive.status(self.ring) if self._archive is not None else None)
        if feeds:
            for name, feed in (("CA feed", self._feeds["ca"]), ("web feed", self._feeds["web"])):
                if feed is None:
                    continue
                try:
                    feed.publish_status(snapshot)
                except MessageCutError as error:
                    self._replace_feed_socket(name, feed)
                    logger.error("socket replaced after a message cut in half: %s (so far: %s): %s", name,
                                 self.sockets_replaced, error)
