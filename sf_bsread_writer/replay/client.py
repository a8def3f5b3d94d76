"""The writer's end of the replay protocol: a DEALER socket around ``replay.client_state``.

Every decision (when to grant credit, send a heartbeat, give the buffer up
and re-request) is made by :class:`~sf_bsread_writer.replay.client_state.ReplayClientState`;
this shell only moves frames and reads the clock. The protocol:
docs/replay-protocol.md.
"""
from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from sf_bsread_writer import process
from sf_bsread_writer.bsread.spec import DEFAULT_MAX_MESSAGE_BYTES
from sf_bsread_writer.replay.client_state import (
    ReplayClientState,
    ReplayOversizeError,
    Rerequest,
)
from sf_bsread_writer.replay.messages import (
    DEFAULT_WINDOW,
    Accepted,
    Data,
    End,
    ErrorReason,
    Gap,
    Refused,
    ReplayEvent,
    Request,
)
from sf_bsread_writer.transport.connection import WATCHED_EVENTS, GivenUp
from sf_bsread_writer.transport.partsio import (
    MessageCutError,
    PartsReceiver,
    send_parts,
)

__all__ = ["ReplayClient", "ReplayHandshakeError", "ReplayOversizeError", "HANDSHAKE_SECONDS"]

#: How long a writer's start waits for the buffer to accept its request.
HANDSHAKE_SECONDS = 3.0
_MONITORED_EVENTS = (WATCHED_EVENTS | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_FIX = ("use the replay address from the buffer's READY line (its --replay-port), or --direct to read a "
        "plain bsread stream without a buffer")


class ReplayHandshakeError(ConnectionError):
    """The address is not a buffer's replay endpoint, or it did not answer; the message names the fix.

    ``unavailable``: nothing answered at all (a buffer down or restarting:
    trying again later may work), as opposed to a wrong address or a refusal.
    """

    def __init__(self, message: str, unavailable: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable

logger = logging.getLogger(__name__)


class ReplayClient:
    """Asks a buffer for a pulse range (or a time range) and hands out what arrives.

    ``receive`` returns :class:`Data`, :class:`Gap`, :class:`End`,
    :class:`BufferLost` or :class:`Refused` (``replay.messages``); it
    grants credit as the caller consumes Data and sends a heartbeat at
    least every ``heartbeat_interval`` while the caller keeps calling it.
    Call it (or :meth:`keep_alive`, while busy) at least that often (the
    buffer expires a writer silent for its session timeout, 10 s by default). After :class:`BufferLost` the client
    has already re-requested the rest of the range on a new socket. A
    message cut in half on the socket (``partsio.MessageCutError``, sending
    or receiving) does the same, silently for the caller: the socket is
    replaced (``sockets_replaced``, one log line) and the rest of the range
    re-requested after the last pulse id handed out.

    The socket takes no part over twice ``max_message_bytes`` (the
    writer's limit, also sent in the request so that a buffer sends a
    larger message as an ``oversize`` gap): ZeroMQ refuses a larger one at
    its header, before any of it is buffered, and gives the connection up
    for good. The client sees that in the socket's monitor
    (``transport.connection.GivenUp``), asks for the rest of the range on a
    new socket (``reconnects``) and returns ``Gap(None, None, "oversize",
    None)``; the same part again before any data ends the session
    (``ReplayOversizeError``, ``replay.client_state``). Not thread-safe:
    use from one thread. ``clock`` is for tests.

    ``keep_receive_memory`` (default True): :meth:`start` sets the process's
    allocator as the buffer's is (``process.tune_allocator``): the images
    libzmq receives for this client come from memory the process keeps and
    reuses, instead of memory glibc hands back to the kernel whenever the
    queue runs empty and faults in again for the next image (a fresh
    process received 1 MB camera images with 15-110 page faults each, 3-5
    so; docs/performance.md). Process-wide, and the process keeps its peak
    (bounded by the window: at most ``max_in_flight_bytes`` of the buffer,
    64 MB, in flight, plus what the caller holds). False leaves the
    allocator alone, for a process that gives its memory back (the web
    service's ranges).
    """

    def __init__(self, address: str, start_pulse_id: int | None = None, start_time: float | None = None,
                 stop_pulse_id: int | None = None, stop_time: float | None = None, window: int = DEFAULT_WINDOW,
                 heartbeat_interval: float = 1.0, peer_timeout: float = 5.0,
                 context: zmq.Context | None = None, clock: Callable[[], float] = time.monotonic,
                 label: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 keep_receive_memory: bool = True) -> None:
        self.address = address
        self.state = ReplayClientState(Request(start_pulse_id, start_time, stop_pulse_id, stop_time, window,
                                               message_times=True, label=label,
                                               max_message_bytes=max_message_bytes),
                                       heartbeat_interval, peer_timeout)
        self.max_part_bytes = 2 * max_message_bytes  # the socket's ZMQ_MAXMSGSIZE, as every bounded socket's
        self._clock = clock
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self.session_id: str | None = None  # the routing id of the current socket, as the buffer logs it
        self._monitor: zmq.Socket | None = None  # ZeroMQ's own view of the connection (handshake, given up)
        self._given_up = GivenUp()
        self._early: list[ReplayEvent] = []  # events read during the handshake, for receive()
        self._receiver = PartsReceiver()
        self._cut: MessageCutError | None = None  # a send cut the current socket: replace it before using it
        self.sockets_replaced = 0
        self.reconnects = 0  # new sockets after ZeroMQ gave a connection up (a part over max_part_bytes)
        self.keep_receive_memory = keep_receive_memory

    # -- what the state knows -------------------------------------------------
    @property
    def last_pulse_id(self) -> int | None:
        """Pulse id of the last Data returned."""
        return self.state.last_pulse_id

    @property
    def ended(self) -> End | None:
        return self.state.ended

    @property
    def accepted(self) -> Accepted | None:
        return self.state.accepted

    @property
    def restarts(self) -> int:
        """Re-requests after a lost buffer or a forgotten session."""
        return self.state.restarts

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "ReplayClient":
        if self.keep_receive_memory:  # before the socket receives anything (class docstring)
            try:
                process.tune_allocator()
            except Exception as error:  # an optimisation, never a reason not to receive
                logger.warning("allocator tuning failed: %s", error)
        self._open()
        self._send(self.state.start(self._clock()))
        logger.info("replay session %s: requested %s from %s", self.session_id, self.state.request, self.address)
        return self

    def _open(self) -> None:
        socket = self._context.socket(zmq.DEALER)
        try:
            socket.setsockopt(zmq.LINGER, 0)
            # Our own routing id: the buffer names the session by it, so both logs say the same id.
            self.session_id = secrets.token_hex(8)
            socket.setsockopt(zmq.ROUTING_ID, bytes.fromhex(self.session_id))
            # In flight is bounded by the window (and the buffer's bytes in flight): no queue limit needed here.
            socket.setsockopt(zmq.RCVHWM, 0)
            # But not the size of one part: whatever sends on this port, a part over the writer's own bound is
            # refused at its header (the connection then given up: receive() sees it and asks anew).
            socket.setsockopt(zmq.MAXMSGSIZE, self.max_part_bytes)
            self._monitor = socket.get_monitor_socket(_MONITORED_EVENTS)
            self._given_up = GivenUp()
            socket.connect(self.address)
        except BaseException:
            if self._monitor is not None:
                self._monitor.close(linger=0)
                self._monitor = None
            socket.close(linger=0)
            raise
        self._socket = socket

    def handshake(self, timeout: float = HANDSHAKE_SECONDS) -> Accepted:
        """Wait until the buffer accepts the request; ReplayHandshakeError (naming the fix) if it does not.

        Tells apart, with ZeroMQ's socket monitor: nothing listening at the
        address, a peer that drops the connection in the ZeroMQ handshake (a
        socket of another type: a buffer's live output, a PUB or PUSH), a
        ZeroMQ peer that never answers the request, and a buffer that refuses
        it (too many writers, say). What arrives after the acceptance is kept
        for :meth:`receive`.
        """
        socket = self._socket
        assert socket is not None, "start() first"
        deadline = time.monotonic() + timeout
        connected = handshaken = False
        try:
            while self.state.accepted is None:
                for event in self._monitor_events():
                    if event == zmq.EVENT_CONNECTED:
                        connected = True
                    elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        handshaken = True
                    elif event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL) or (
                            event == zmq.EVENT_DISCONNECTED and connected and not handshaken):
                        raise ReplayHandshakeError(
                            f"{self.address} is not a replay endpoint: the peer there ended the ZeroMQ handshake "
                            f"(a socket of another type, such as a buffer's live output); {_FIX}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if not connected:
                        raise ReplayHandshakeError(f"nothing answers at {self.address} within {timeout:g} s: is the "
                                                   f"buffer running there? {_FIX}", unavailable=True)
                    raise ReplayHandshakeError(f"{self.address} did not answer the replay request within "
                                               f"{timeout:g} s (a ZeroMQ peer, but not a buffer?); {_FIX}")
                if self._cut is not None or not socket.poll(int(min(remaining, 0.05) * 1000) + 1):
                    socket = self._replace_if_cut(socket)
                    continue
                socket, parts = self._receive(socket)
                if parts is None:
                    continue
                kind, rest = parts
                event = self.state.received_parts(kind[0] if kind else None, rest, self._clock())
                if isinstance(event, Refused):
                    raise ReplayHandshakeError(f"the buffer at {self.address} refused the request: "
                                               f"{event.reason}: {event.detail}",
                                               unavailable=event.reason == ErrorReason.TOO_MANY_SESSIONS.value)
                if isinstance(event, Rerequest):  # the buffer restarted meanwhile: ask it again
                    self._restart()
                    socket = self._socket
                    connected = handshaken = True  # it answered: only its acceptance is awaited now
                elif event is not None:
                    self._early.append(event)
        except BaseException:
            self._stop_monitor()
            raise
        return self.state.accepted

    def _monitor_events(self) -> list[int]:
        events = []
        while self._monitor is not None and self._monitor.poll(0):
            events.append(recv_monitor_message(self._monitor)["event"])
            self._given_up.event(events[-1], time.monotonic())  # ZeroMQ's timing: the real clock
        return events

    def _stop_monitor(self) -> None:
        if self._monitor is not None and self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
        self._monitor = None

    def _receive(self, socket: zmq.Socket) -> tuple[zmq.Socket, tuple[list[bytes], Any] | None]:
        """One message from ``socket`` (which has one waiting): (socket, (the kind frame, the rest packed)).

        A message cut in half leaves the socket in the middle of the next one:
        then (the socket that replaced it, None), the rest of the range
        requested again on the new one (:meth:`_replace_if_cut`).
        """
        try:
            return socket, self._receiver.receive(socket, 0, 1)
        except MessageCutError as error:
            self._cut = error
            return self._replace_if_cut(socket), None

    def _replace_if_cut(self, socket: zmq.Socket) -> zmq.Socket:
        """After a message cut in half on ``socket``: a new socket, the rest of the range requested on it."""
        if self._cut is None:
            return socket
        error, self._cut = self._cut, None
        self.sockets_replaced += 1
        logger.error("replay session %s: socket replaced (%d so far), the rest of the range requested again: %s",
                     self.session_id, self.sockets_replaced, error)
        self._restart()
        assert self._socket is not None
        return self._socket

    def _restart(self) -> None:
        """Re-request the rest of the range on a fresh socket (stale in-flight messages die with the old one)."""
        self._stop_monitor()
        if self._socket is not None:
            self._socket.close(linger=0)
        self._open()
        self._send(self.state.restart(self._clock()))
        logger.info("replay session %s: the rest of the range requested again, after pulse_id %s",
                    self.session_id, self.state.last_pulse_id)

    def _send(self, frames: list[bytes] | None) -> None:
        if frames is None:
            return
        assert self._socket is not None, "start() first"
        try:
            send_parts(self._socket, frames, nonblocking=True)
        except zmq.Again:
            # Not connected yet or the buffer is gone: the heartbeat/timeout logic copes.
            logger.debug("replay: could not send to %s now", self.address)
        except MessageCutError as error:  # replaced where the socket is used next (_replace_if_cut)
            self._cut = error

    def keep_alive(self) -> None:
        """Send a credit if one is due, without receiving: for a caller busy with one message for long.

        The buffer forgets a writer silent for its session timeout (10 s),
        and a writer creating thousands of channel groups or writing a
        block of them does not call :meth:`receive` for seconds. It calls
        this now and then instead (``H5File.keep_alive``): a heartbeat
        (the cumulative count of messages received so far, so no new
        credit for messages not yet received) when ``heartbeat_interval``
        has passed, nothing otherwise (a clock read and a comparison).
        The session, and with it the writer's place in the ring, stays.
        Same thread as :meth:`receive`.
        """
        if self._socket is not None:
            self._send(self.state.credit(self._clock()))

    def set_stop(self, stop_pulse_id: int | None = None, stop_time: float | None = None) -> None:
        """Move the stop of the running session (inclusive); None removes that stop."""
        self._send(self.state.set_stop(stop_pulse_id, stop_time))

    def close(self) -> None:
        """Tell the buffer (best effort) and close the socket; safe to call twice."""
        self._stop_monitor()
        if self._socket is None:
            return
        self._send(self.state.close())
        self._socket.close(linger=0)
        self._socket = None

    def __enter__(self) -> "ReplayClient":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _part_refused(self) -> Gap:
        """ZeroMQ gave the connection up (a part over max_part_bytes refused): the rest on a new socket."""
        gap = self.state.part_refused(self.max_part_bytes)  # or ReplayOversizeError: the same again
        self.reconnects += 1
        logger.error("replay session %s: the connection to %s was given up by ZeroMQ after a part over %d bytes "
                     "(twice --max-message-bytes) after pulse_id %s: a message lost, the rest of the range "
                     "requested again (%d so far)", self.session_id, self.address, self.max_part_bytes,
                     self.state.last_pulse_id, self.reconnects)
        self._restart()
        return gap

    # -- receiving ---------------------------------------------------------
    def receive(self, timeout: float) -> ReplayEvent | None:
        """The next event, or None if nothing arrived within ``timeout`` seconds."""
        socket = self._socket
        assert socket is not None, "start() first"
        if self._early:
            return self._early.pop(0)
        state, clock = self.state, self._clock
        deadline = clock() + timeout
        while True:
            now = clock()
            self._send(state.credit(now))
            socket = self._replace_if_cut(socket)
            if not socket.poll(int(state.wait_seconds(now, deadline) * 1000)):
                # Nothing more comes on a connection ZeroMQ gave up: looked at only when nothing arrives.
                self._monitor_events()
                if self._given_up.check(time.monotonic()):
                    return self._part_refused()
                now = clock()
                lost = state.silence(now)
                if lost is not None:
                    logger.warning("replay: buffer %s silent for %.1f s; re-requesting", self.address,
                                   lost.seconds_silent)
                    self._restart()
                    return lost
                if now >= deadline:
                    return None
                continue
            socket, parts = self._receive(socket)
            if parts is None:
                continue
            kind, rest = parts
            received_at = clock()
            event = state.received_parts(kind[0] if kind else None, rest, received_at)
            if event is None:
                continue
            if isinstance(event, Rerequest):
                logger.warning("replay: buffer %s forgot this session; re-requesting", self.address)
                self._restart()
                socket = self._socket
                continue
            if isinstance(event, Data):
                self._send(state.credit(received_at))
            return event

