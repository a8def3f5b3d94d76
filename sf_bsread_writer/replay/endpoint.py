"""The buffer's replay endpoint: a ROUTER socket and one pure ``ReplaySession`` per writer.

The sessions (``replay.session``) decide what each writer gets; this
shell reads the writers' messages, sends what the sessions return, and
keeps the totals for the status snapshot. It runs in the buffer's loop
thread, which owns the ring, and never blocks: a writer that does not keep
up is simply served less (credits), and a vanished one is dropped.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from sf_bsread_writer.replay.messages import (
    Accepted,
    CloseSession,
    Data,
    End,
    ErrorReason,
    Gap,
    Heartbeat,
    ReplayProtocolError,
    Request,
    build_accepted,
    build_end,
    build_error,
    build_gap,
    build_heartbeat,
    data_kind,
    parse_writer_message,
)
from sf_bsread_writer.replay.session import ReplaySession
from sf_bsread_writer.ring import Ring
from sf_bsread_writer.status import ReplayStatus
from sf_bsread_writer.transport.partsio import (
    MessageCutError,
    bind_again,
    receive_frames,
    send_parts,
)

__all__ = ["ReplayEndpoint"]

logger = logging.getLogger(__name__)

# Ring entries one replay session may look at per pass over the sessions, and in all per pass.
SESSION_BUDGET = 32
REPLAY_BUDGET = 512
# Parts below this are copied on send by the ROUTER (pyzmq's copy_threshold).
# pyzmq's default (64 KiB) sends a larger bytes part, e.g. the ~70 kB data
# header of a 500-channel stream that the ring keeps as bytes, zero-copy: a
# Python-side zmq.Frame plus a round trip through pyzmq's garbage-collector
# thread on every send, far dearer than copying 70 kB. zmq.Frame parts (the
# large parts the ring keeps as received: images) are always sent by
# reference, whatever this says.
REPLAY_COPY_THRESHOLD = 1024 * 1024
REPLAY_REQUEST_BATCH = 256
# The ROUTER never holds more than window + a few control messages per writer.
REPLAY_SNDHWM = 100_000
# ZMTP heartbeats: a writer whose connection stops moving (it stopped reading
# its socket) is disconnected, and what was queued for it freed, after this.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 10_000
# A writer whose message part exceeds this is disconnected by libzmq before
# anything reads it; smaller malformed messages are answered with a reason.
REPLAY_MAX_INBOUND_BYTES = 64 * 1024
# A writer's losses are logged at most this often per writer.
GAP_LOG_SECONDS = 5.0

_TOTALS = ("started", "ended", "expired", "refused", "disconnected", "send_failures", "sent", "gaps", "lost")


class ReplayEndpoint:
    """Serves every writer's session from ``ring``; owned by the buffer's loop thread.

    :meth:`serve` reads what the writers sent and sends what their sessions
    owe until nothing can be sent or a deadline passes; :meth:`expire`
    drops sessions whose writer fell silent; :meth:`status` is this
    endpoint in the buffer's snapshot.
    """

    def __init__(self, context: zmq.Context, address: str, ring: Ring, heartbeat_interval: float,
                 session_timeout: float, clock: Callable[[], float] = time.monotonic, max_sessions: int = 16,
                 max_in_flight_bytes: int | None = 64 * 1024**2) -> None:
        self.ring = ring
        self.clock = clock
        self.max_sessions = max_sessions
        self.max_in_flight_bytes = max_in_flight_bytes
        self.heartbeat_interval = heartbeat_interval
        self.session_timeout = session_timeout
        self._context = context
        self.socket = self._bound_router(address)
        self.address: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sessions: dict[bytes, ReplaySession] = {}
        self._totals = dict.fromkeys(_TOTALS, 0)
        self._gap_logged: dict[bytes, float] = {}
        self._round_robin = 0
        self.sockets_replaced = 0
        # --archive: the archive's address (nats://HOST:PORT/NAME), told to every writer in its acceptance so
        # that it reads pulses older than the ring from there (archive.reach_back).
        self.archive: str | None = None

    def _bound_router(self, address: str, again: bool = False) -> zmq.Socket:
        router = self._context.socket(zmq.ROUTER)
        try:
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished writer raises instead of dropping
            router.setsockopt(zmq.MAXMSGSIZE, REPLAY_MAX_INBOUND_BYTES)
            router.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            router.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
            router.setsockopt(zmq.SNDHWM, REPLAY_SNDHWM)
            router.setsockopt(zmq.LINGER, 0)
            router.copy_threshold = REPLAY_COPY_THRESHOLD
            if again:
                bind_again(router, address)
            else:
                router.bind(address)
        except BaseException:
            router.close(linger=0)
            raise
        return router

    def _replace_socket(self, error: MessageCutError) -> None:
        """A message cut in half on the ROUTER (transport.partsio): a new one at the same address.

        Every session ends with the old socket (what was in flight is gone);
        each writer's next message reaches the new socket as an unknown
        session, is told so, and the writer requests the rest of its range
        again (``replay.client_state``: Rerequest).
        """
        self.socket.close(linger=0)
        for identity, session in list(self._sessions.items()):
            self._totals["ended"] += 1
            self._retire(identity, session)
        self.socket = self._bound_router(self.address, again=True)
        self.sockets_replaced += 1
        logger.error("replay: socket replaced (%d so far), every session ended: %s", self.sockets_replaced, error)

    def close(self) -> None:
        self.socket.close(linger=0)
        self._sessions.clear()

    # -- serving ------------------------------------------------------------
    def serve(self, deadline: float) -> bool:
        """Read writer messages and serve sessions until nothing can be sent or ``deadline`` passed.

        Returns True if some session still has something to send (the loop must not sleep).
        Credits are read between passes, so a writer that keeps up is served
        continuously within the slice instead of once per loop turn (one pass
        sends at most SESSION_BUDGET messages to a session).
        """
        while True:
            try:
                self._read_requests(self.clock())
                busy = self._serve_sessions(self.clock())
            except MessageCutError as error:  # the caller polls ``self.socket``: it changed
                self._replace_socket(error)
                return False
            if not busy or self.clock() >= deadline:
                return busy

    def expire(self, now: float) -> None:
        """Drop the sessions whose writer has been silent for ``session_timeout``.

        What the writers sent is read first: a buffer that could not run for a while (a loaded machine, a
        long call holding the interpreter) finds their heartbeats waiting in its socket, and a writer that
        kept sending is never taken for a silent one. A message cut in half is left to :meth:`serve`, which
        replaces the socket (a cut socket refuses every later call) where its caller sees it.
        """
        try:
            self._read_requests(now)
        except MessageCutError:
            return
        for identity, session in list(self._sessions.items()):
            if session.expired(now, self.session_timeout):
                logger.warning("replay: session %s expired (writer silent for %.1f s) after %d messages; "
                               "%d messages lost", session.session_id, now - session.last_heard, session.sent,
                               session.lost)
                self._totals["expired"] += 1
                self._retire(identity, session)

    def status(self) -> ReplayStatus:
        """Totals since the start (active sessions included) and every active session."""
        totals = dict(self._totals)
        for session in self._sessions.values():
            totals["sent"] += session.sent
            totals["gaps"] += session.gaps
            totals["lost"] += session.lost
        sessions = tuple(session.status() for session in self._sessions.values())
        return ReplayStatus(active_sessions=len(sessions), sessions=sessions, **totals)

    # -- writer -> buffer ---------------------------------------------------
    def _read_requests(self, now: float) -> None:
        router = self.socket
        for _ in range(REPLAY_REQUEST_BATCH):
            try:
                parts = receive_frames(router, zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, body = parts[0], parts[1:]
            try:
                self._handle(identity, body, now)
            except MessageCutError:
                raise  # the socket, not this writer's message: serve() replaces it
            except ReplayProtocolError as error:
                self._totals["refused"] += 1
                logger.warning("replay: malformed message from %s: %s", identity.hex(), error)
                self._send_control(identity, build_error(error.reason, error.detail))
            except Exception:  # a bug must cost one writer's message, never the buffer
                self._totals["refused"] += 1
                logger.exception("replay: message from %s could not be handled", identity.hex())
                self._send_control(identity, build_error(ErrorReason.BAD_FIELD, "the buffer could not handle it"))

    def _handle(self, identity: bytes, body: list[bytes], now: float) -> None:
        """One message of a writer (ReplayProtocolError if it does not follow the protocol)."""
        session = self._sessions.get(identity)
        message = parse_writer_message(body)
        if isinstance(message, Request):
            if session is not None:
                self._retire(identity, session)
            elif len(self._sessions) >= self.max_sessions:  # a full house, not a malformed message
                self._totals["refused"] += 1
                logger.warning("replay: a request of %s refused: %d writers already (--max-writers)",
                               identity.hex(), len(self._sessions))
                self._send_control(identity, build_error(
                    ErrorReason.TOO_MANY_SESSIONS, f"the buffer serves at most {self.max_sessions} writers at once "
                    "(--max-writers); try again when one has ended"))
                return
            session = ReplaySession(identity.hex(), message, self.ring, now, self.heartbeat_interval,
                                    self.max_in_flight_bytes)
            self._sessions[identity] = session
            self._totals["started"] += 1
            logger.info("replay: session %s: start pulse %s / time %s, stop pulse %s / time %s, window %d",
                        session.session_id, message.start_pulse_id, message.start_time,
                        message.stop_pulse_id, message.stop_time, session.window)
            self._send_control(identity, build_accepted(Accepted(
                session.window, self.ring.oldest_pulse_id, self.ring.newest_pulse_id, self.archive)))
        elif session is None:
            if not isinstance(message, CloseSession):
                self._send_control(identity, build_error(
                    ErrorReason.UNKNOWN_SESSION, "no session for this writer: send a request first"))
        elif isinstance(message, CloseSession):
            logger.info("replay: session %s closed by the writer", session.session_id)
            self._retire(identity, session)
        else:
            session.on_message(message, now)

    # -- buffer -> writer ---------------------------------------------------
    def _serve_sessions(self, now: float) -> bool:
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
                if not self._send_event(identity, event):
                    break
            budget -= max(1, session.sent - before)
            if session.ended is not None:
                logger.info("replay: session %s ended (%s) after %d messages, last pulse %s; %d gap notices, "
                            "%d messages lost", session.session_id, session.ended.reason, session.sent,
                            session.ended.last_pulse_id, session.gaps, session.lost)
                self._totals["ended"] += 1
                self._retire(identity, session)
            elif identity in self._sessions and session.has_work(self.ring):
                busy = True
        return busy

    def _send_control(self, identity: bytes, frames: list[bytes]) -> bool:
        try:
            send_parts(self.socket, frames, [identity], nonblocking=True)
            return True
        except zmq.ZMQError as error:  # Again (HWM) or EHOSTUNREACH (writer gone)
            logger.debug("replay: cannot send to %s: %s", identity.hex(), error)
            return False

    def _send_event(self, identity: bytes, event: Any) -> bool:
        """One event of a session: data as identity, kind frame, the original frames (``build_data``)."""
        if isinstance(event, Data):
            head, frames = [identity, data_kind(event.pulse_id, event.time)], event.frames
        elif isinstance(event, Gap):
            head, frames = [identity], build_gap(event)
            self._log_gap(identity, event)
        elif isinstance(event, End):
            head, frames = [identity], build_end(event)
        elif isinstance(event, Heartbeat):
            head, frames = [identity], build_heartbeat(event)
        else:  # pragma: no cover - sessions produce nothing else
            raise TypeError(f"unexpected replay event {event!r}")
        try:
            send_parts(self.socket, frames, head, nonblocking=True)
        except zmq.ZMQError as error:
            return self._send_failed(identity, error)
        return True

    def _log_gap(self, identity: bytes, gap: Gap) -> None:
        """A writer's losses, at most every GAP_LOG_SECONDS per writer (a slow writer may lose on every pass)."""
        now = self.clock()
        if now - self._gap_logged.get(identity, -1e9) < GAP_LOG_SECONDS:
            return
        self._gap_logged[identity] = now
        logger.info("replay: session %s: %s messages lost (%s), pulse ids %s..%s", identity.hex(),
                    "unknown" if gap.count is None else gap.count, gap.reason, gap.first_pulse_id, gap.last_pulse_id)

    def _send_failed(self, identity: bytes, error: zmq.ZMQError) -> bool:
        session = self._sessions.get(identity)
        if error.errno == zmq.EHOSTUNREACH:
            self._totals["disconnected"] += 1
            logger.info("replay: writer of session %s disconnected", identity.hex())
        else:
            # Cannot happen while the writer respects its window; the session ends and the
            # writer (BufferLost after its peer timeout) re-requests from where it was.
            self._totals["send_failures"] += 1
            logger.error("replay: cannot send to session %s (%s); dropping the session", identity.hex(), error)
        if session is not None:
            self._retire(identity, session)
        return False

    def _retire(self, identity: bytes, session: ReplaySession) -> None:
        if self._sessions.get(identity) is session:
            del self._sessions[identity]
            self._gap_logged.pop(identity, None)
            self._totals["sent"] += session.sent
            self._totals["gaps"] += session.gaps
            self._totals["lost"] += session.lost
