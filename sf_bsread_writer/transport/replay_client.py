"""The writer's end of the replay protocol: a DEALER socket around ``core.replay_client``.

Every decision (when to grant credit, send a heartbeat, give the buffer up
and re-request) is made by :class:`~sf_bsread_writer.core.replay_client.ReplayClientState`;
this shell only moves frames and reads the clock. The protocol:
docs/replay-protocol.md.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from ..core.replay_client import ReplayClientState, Rerequest
from ..core.replay_messages import DEFAULT_WINDOW, Accepted, Data, End, ReplayEvent, Request
from .multipart import AdaptiveReceiver

__all__ = ["ReplayClient"]

logger = logging.getLogger(__name__)


class ReplayClient:
    """Asks a buffer for a pulse range (or a time range) and hands out what arrives.

    ``receive`` returns :class:`Data`, :class:`Gap`, :class:`End`,
    :class:`BufferLost` or :class:`Refused` (``core.replay_messages``); it
    grants credit as the caller consumes Data and sends a heartbeat at
    least every ``heartbeat_interval`` while the caller keeps calling it.
    Call it at least that often (the buffer expires a writer silent for its
    session timeout, 10 s by default). After :class:`BufferLost` the client
    has already re-requested the rest of the range on a new socket. Not
    thread-safe: use from one thread. ``clock`` is for tests.
    """

    def __init__(self, address: str, start_pulse_id: int | None = None, start_time: float | None = None,
                 stop_pulse_id: int | None = None, stop_time: float | None = None, window: int = DEFAULT_WINDOW,
                 heartbeat_interval: float = 1.0, peer_timeout: float = 5.0,
                 context: zmq.Context | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.state = ReplayClientState(Request(start_pulse_id, start_time, stop_pulse_id, stop_time, window),
                                       heartbeat_interval, peer_timeout)
        self._clock = clock
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._receiver = AdaptiveReceiver()

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
        self._open()
        self._send(self.state.start(self._clock()))
        return self

    def _open(self) -> None:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        # In flight is bounded by the window: no receive limit needed here.
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.connect(self.address)
        self._socket = socket

    def _restart(self) -> None:
        """Re-request the rest of the range on a fresh socket (stale in-flight messages die with the old one)."""
        if self._socket is not None:
            self._socket.close(linger=0)
        self._open()
        self._send(self.state.restart(self._clock()))

    def _send(self, frames: list[bytes] | None) -> None:
        if frames is None:
            return
        assert self._socket is not None, "start() first"
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            # Not connected yet or the buffer is gone: the heartbeat/timeout logic copes.
            logger.debug("replay: could not send to %s now", self.address)

    def set_stop(self, stop_pulse_id: int | None = None, stop_time: float | None = None) -> None:
        """Move the stop of the running session (inclusive); None removes that stop."""
        self._send(self.state.set_stop(stop_pulse_id, stop_time))

    def close(self) -> None:
        """Tell the buffer (best effort) and close the socket; safe to call twice."""
        if self._socket is None:
            return
        self._send(self.state.close())
        self._socket.close(linger=0)
        self._socket = None

    def __enter__(self) -> "ReplayClient":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- receiving ---------------------------------------------------------
    def receive(self, timeout: float) -> ReplayEvent | None:
        """The next event, or None if nothing arrived within ``timeout`` seconds."""
        socket = self._socket
        assert socket is not None, "start() first"
        state, clock = self.state, self._clock
        deadline = clock() + timeout
        while True:
            now = clock()
            self._send(state.credit(now))
            if not socket.poll(int(state.wait_seconds(now, deadline) * 1000)):
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
            frames = self._receiver.receive(socket)
            received_at = clock()
            event = state.received(frames, received_at)
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

