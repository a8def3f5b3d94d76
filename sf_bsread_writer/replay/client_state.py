"""The writer's side of the replay protocol, without a socket: credit, heartbeats, re-requests (pure).

:class:`ReplayClientState` makes every decision of the writer's replay
client and leaves the socket to its shell
(``replay.client.ReplayClient``): frames received go in with the
time they arrived, and what comes out is either frames to send or an event
for the writer. ``now`` is always an argument, so the timing rules are
tested with a fake clock:

* **credit**: the writer grants ``window`` messages in flight at the start
  and then reports its cumulative count of messages consumed, every quarter
  window or at least every ``heartbeat_interval`` (a credit doubles as the
  writer's heartbeat: the buffer expires a writer silent for its session
  timeout, 10 s by default);
* **a lost buffer**: nothing at all (not even a heartbeat) heard for
  ``peer_timeout`` -> :class:`BufferLost` once, and the shell re-requests
  the rest of the range on a new socket (from the pulse after the last one
  received), so a restarted buffer continues the stream. The same happens
  when the buffer answers ``unknown_session`` (it restarted and forgot the
  writer): :class:`Rerequest`.
* **a part over the socket's bound**: ZeroMQ refuses it at its header and
  gives the connection up for good; the shell asks for the rest of the
  range on a new socket and hands the writer a :class:`Gap` (``oversize``,
  pulse ids unknown: a loss, the outcome partial). The same again before
  any data arrived in between (a peer that sends it every time, e.g. a
  buffer that does not know the request's ``max_message_bytes``) ends the
  session: :class:`ReplayOversizeError`, never a loop.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sf_bsread_writer.replay.messages import (
    MAX_WINDOW,
    Accepted,
    BufferLost,
    Data,
    End,
    ErrorReason,
    Gap,
    GapReason,
    Heartbeat,
    Refused,
    ReplayEvent,
    ReplayProtocolError,
    Request,
    build_close,
    build_credit,
    build_request,
    build_set_stop,
    parse_buffer_parts,
)

__all__ = ["ReplayClientState", "Rerequest", "ReplayOversizeError"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rerequest:
    """The buffer forgot this session (it restarted): ask for the rest of the range on a new socket."""


class ReplayOversizeError(ConnectionError):
    """The peer at the replay address sent a part over the writer's bound again before anything else arrived."""


class ReplayClientState:
    """Everything the writer's replay client decides; see the module docstring.

    The shell's loop::

        send(state.start(now))                     # on a new socket
        loop:
            send(state.credit(now))                # when not None
            poll the socket for state.wait_seconds(now, deadline)
            nothing: state.silence(now) -> BufferLost: new socket, send(state.restart(now))
            frames:  state.received(frames, now) -> Data/Gap/End/Refused for the writer,
                     Rerequest (new socket, send(state.restart(now))) or None (keep going)

    Not thread-safe: one owner.
    """

    def __init__(self, request: Request, heartbeat_interval: float = 1.0, peer_timeout: float = 5.0) -> None:
        if (request.start_pulse_id is None) == (request.start_time is None):
            raise ValueError("give exactly one of start_pulse_id and start_time")
        if not 1 <= request.window <= MAX_WINDOW:
            raise ValueError(f"window must be 1..{MAX_WINDOW}")
        self.request = request
        self.stop_pulse_id = request.stop_pulse_id
        self.stop_time = request.stop_time
        self.window = request.window
        self.heartbeat_interval = heartbeat_interval
        self.peer_timeout = peer_timeout
        self.last_pulse_id: int | None = None  # last Data pulse id returned
        self.ended: End | None = None
        self.accepted: Accepted | None = None
        self.restarts = 0  # re-requests after a lost buffer / forgotten session
        self.parts_refused = 0  # connections ZeroMQ gave up after a part over the socket's bound
        self._data_since_refused = True
        self._credit_step = max(1, self.window // 4)
        self._received = 0  # Data returned to the caller on the current socket
        self._credited = 0  # last cumulative count reported
        self._last_credit_time = 0.0
        self._last_heard = 0.0

    # -- what to send ---------------------------------------------------------
    def start(self, now: float) -> list[bytes]:
        """The request to send on the first socket."""
        self._new_socket(now)
        return build_request(self.request)

    def restart(self, now: float) -> list[bytes]:
        """The request to send on a new socket: the rest of the range (in-flight messages died with the old one)."""
        self.restarts += 1
        self._new_socket(now)
        if self.last_pulse_id is not None:
            start_pulse_id, start_time = self.last_pulse_id + 1, None
        else:
            start_pulse_id, start_time = self.request.start_pulse_id, self.request.start_time
        return build_request(Request(start_pulse_id, start_time, self.stop_pulse_id, self.stop_time, self.window,
                                     self.request.message_times, self.request.label,
                                     self.request.max_message_bytes))

    def credit(self, now: float) -> list[bytes] | None:
        """A credit message if one is due (a quarter window consumed, or a heartbeat interval passed)."""
        if self.ended is not None:
            return None
        if (self._received - self._credited >= self._credit_step
                or now - self._last_credit_time >= self.heartbeat_interval):
            self._credited = self._received
            self._last_credit_time = now
            return build_credit(self._received)
        return None

    def set_stop(self, stop_pulse_id: int | None = None, stop_time: float | None = None) -> list[bytes]:
        """Move the stop of the running session (inclusive); None removes that stop."""
        self.stop_pulse_id, self.stop_time = stop_pulse_id, stop_time
        return build_set_stop(stop_pulse_id, stop_time)

    def close(self) -> list[bytes] | None:
        """What to tell the buffer when the writer is done (nothing once the session has ended)."""
        return build_close() if self.ended is None else None

    # -- what happened ----------------------------------------------------------
    def wait_seconds(self, now: float, deadline: float) -> float:
        """How long the shell may wait for a message before a credit or the silence check is due."""
        return max(0.0, min(deadline - now, self.heartbeat_interval / 2))

    def silence(self, now: float) -> BufferLost | None:
        """Nothing arrived while waiting: BufferLost if the buffer has been silent too long (then :meth:`restart`).

        Only silence counts: messages waiting unread are not the buffer's fault.
        """
        silent = now - self._last_heard
        if self.ended is None and silent > self.peer_timeout:
            return BufferLost(silent)
        return None

    def part_refused(self, bound: int) -> Gap:
        """ZeroMQ refused a part over ``bound`` bytes and gave the connection up: the loss to report.

        Then :meth:`restart` on a new socket. The first message after the
        last one received was that part's: its pulse id is unknown (so is
        the count). Raises :class:`ReplayOversizeError` when nothing arrived
        since the last refusal: the peer sends it again on every request.
        """
        self.parts_refused += 1
        if self.parts_refused > 1 and not self._data_since_refused:
            raise ReplayOversizeError(
                f"the peer sent a part over {bound} bytes (twice --max-message-bytes) again after pulse_id "
                f"{self.last_pulse_id}: a buffer with a larger --max-message-bytes that does not send such a message "
                f"as a gap (an older version), or not a buffer; raise the writer's --max-message-bytes to take it")
        self._data_since_refused = False
        return Gap(None, None, GapReason.OVERSIZE.value, None)

    def received(self, frames: Sequence[Any], now: float) -> ReplayEvent | Rerequest | None:
        """One message from the buffer, as a list of frames: see :meth:`received_parts`."""
        return self.received_parts(frames[0] if frames else None, list(frames[1:]), now)

    def received_parts(self, kind_frame: Any, rest: Sequence[Any] | None,
                       now: float) -> ReplayEvent | Rerequest | None:
        """One message from the buffer (its kind frame and the rest) -> an event, :class:`Rerequest`, or None.

        Data counts towards the next credit (call :meth:`credit` after it);
        heartbeats and the acceptance only prove the buffer alive; nothing
        after End counts; a malformed message is logged and dropped.
        """
        self._last_heard = now
        try:
            event = parse_buffer_parts(kind_frame, rest)
        except ReplayProtocolError as error:
            logger.warning("replay: malformed message from the buffer dropped: %s", error)
            return None
        if self.ended is not None:
            return None
        if isinstance(event, Data):
            self._received += 1
            self._data_since_refused = True
            self.last_pulse_id = event.pulse_id
            return event
        if isinstance(event, Heartbeat):
            return None
        if isinstance(event, Accepted):
            self.accepted = event
            return None
        if isinstance(event, End):
            self.ended = event
            return event
        if isinstance(event, Refused) and event.reason == ErrorReason.UNKNOWN_SESSION.value:
            return Rerequest()
        return event  # Gap or Refused

    def _new_socket(self, now: float) -> None:
        self._received = 0
        self._credited = 0
        self._last_heard = now
        self._last_credit_time = now

