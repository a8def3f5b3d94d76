"""The replay protocol between the buffer and its writers, in three layers.

1. **Wire messages** (pure): ``build_*`` functions turn Python values into
   frames and :func:`parse_writer_message` / :func:`parse_buffer_message` turn
   frames back into small dataclasses. No socket is involved, so the
   protocol is unit-tested by feeding frames. The full description, with the
   rationale, is in docs/replay-protocol.md.
2. **Server-side session** (pure): :class:`ReplaySession` is one writer's
   cursor over the ring. Given the ring, the writer's credits and the clock,
   :meth:`ReplaySession.poll` says what to send next (data, gap notices, the
   end notice, heartbeats). The buffer (buffer.py) is a thin shell that
   moves frames between its ROUTER socket and the sessions.
3. **Client** (I/O): :class:`ReplayClient` is the writer's side, a DEALER
   that requests a range, grants credit as its caller consumes messages,
   sends heartbeats and notices a silent buffer.

Why credits: the buffer must never block on a writer and must never queue
without bound for one. A writer grants ``window`` messages at the start and
then reports how many it has consumed; the buffer keeps at most ``window``
data messages in flight to it. A writer that cannot keep up simply stops
being served; if the ring overtakes its cursor, it gets an explicit
:class:`Gap` saying what it lost, never a silent hole.
"""
from __future__ import annotations

import enum
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

__all__ = [
    "PROTOCOL_VERSION",
    "DEFAULT_WINDOW",
    "MAX_WINDOW",
    "GapReason",
    "EndReason",
    "ErrorReason",
    "ReplayProtocolError",
    "Request",
    "Credit",
    "SetStop",
    "Close",
    "Data",
    "Gap",
    "End",
    "BufferLost",
    "Error",
    "Accepted",
    "Heartbeat",
    "ReplayEvent",
    "build_request",
    "build_credit",
    "build_set_stop",
    "build_close",
    "parse_writer_message",
    "build_data",
    "data_kind",
    "build_gap",
    "build_end",
    "build_heartbeat",
    "build_error",
    "build_accepted",
    "parse_buffer_message",
    "ReplaySession",
    "ReplayClient",
]

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DEFAULT_WINDOW = 64
# A writer may not ask for more than this many messages in flight: together
# with the ring's own bound it caps what one writer can pin in memory.
MAX_WINDOW = 4096

# First frame of every buffer -> writer message.
KIND_DATA = b"data"  # b"data <pulse_id>", followed by the original frames
KIND_ACCEPTED = b"accepted"
KIND_GAP = b"gap"
KIND_END = b"end"
KIND_HEARTBEAT = b"heartbeat"
KIND_ERROR = b"error"

# Receiving in ReplayClient._recv_frames: plain ints (pyzmq's constants are
# enum members, costly per part) and the compiled base-class methods (the
# zmq.Socket wrappers add Python-level work per call, paid once per part).
_RCVMORE = int(zmq.RCVMORE)
_BaseSocket = zmq.backend.Socket if issubclass(zmq.Socket, zmq.backend.Socket) else zmq.Socket
_raw_recv = _BaseSocket.recv
_raw_get = _BaseSocket.get


class GapReason(str, enum.Enum):
    """Why messages a writer asked for will never come."""

    EVICTED = "evicted"  # the ring overtook the writer's cursor (writer too slow)
    BEFORE_BUFFER = "before_buffer"  # the requested start lies before the oldest message held
    SOURCE_RESET = "source_reset"  # the source restarted its pulse ids (count may be 0)


class EndReason(str, enum.Enum):
    STOP_PULSE_ID = "stop_pulse_id"  # the stop pulse was delivered or passed (stop is inclusive)
    STOP_TIME = "stop_time"  # a message newer than the stop time arrived


class ErrorReason(str, enum.Enum):
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    BAD_FRAMES = "bad_frames"
    UNKNOWN_TYPE = "unknown_type"
    BAD_FIELD = "bad_field"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_SESSION = "unknown_session"


class ReplayProtocolError(ValueError):
    """A message that does not follow the replay protocol (.reason, .detail)."""

    def __init__(self, reason: ErrorReason | str, detail: str) -> None:
        super().__init__(f"{getattr(reason, 'value', reason)}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------
# Writer -> buffer
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """Start a session: from a pulse id (or a time) onwards, optionally up to a stop (inclusive)."""

    start_pulse_id: int | None = None
    start_time: float | None = None
    stop_pulse_id: int | None = None
    stop_time: float | None = None
    window: int = DEFAULT_WINDOW


@dataclass(frozen=True)
class Credit:
    """Cumulative count of data messages the writer has consumed; doubles as its heartbeat."""

    received: int


@dataclass(frozen=True)
class SetStop:
    """Change the stop of a running session (None: no stop of that kind)."""

    stop_pulse_id: int | None = None
    stop_time: float | None = None


@dataclass(frozen=True)
class Close:
    """The writer is done; the buffer forgets the session."""


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def build_request(request: Request) -> list[bytes]:
    body: dict[str, Any] = {"type": "request", "version": PROTOCOL_VERSION, "window": request.window}
    for name in ("start_pulse_id", "start_time", "stop_pulse_id", "stop_time"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    return [_dumps(body)]


def build_credit(received: int) -> list[bytes]:
    return [_dumps({"type": "credit", "received": received})]


def build_set_stop(stop_pulse_id: int | None = None, stop_time: float | None = None) -> list[bytes]:
    return [_dumps({"type": "stop", "stop_pulse_id": stop_pulse_id, "stop_time": stop_time})]


def build_close() -> list[bytes]:
    return [_dumps({"type": "close"})]


def _frame_bytes(frame: Any) -> bytes:
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, zmq.Frame):
        return frame.bytes
    return bytes(frame)


def _load_object(frame: Any) -> dict[str, Any]:
    try:
        body = json.loads(_frame_bytes(frame))
    except (UnicodeDecodeError, ValueError) as error:
        raise ReplayProtocolError(ErrorReason.NOT_JSON, f"not JSON: {error}") from None
    if not isinstance(body, dict):
        raise ReplayProtocolError(ErrorReason.NOT_OBJECT, f"expected a JSON object, got {type(body).__name__}")
    return body


def _pulse_id_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReplayProtocolError(ErrorReason.BAD_FIELD, f"{name} must be a non-negative integer, not {value!r}")
    return value


def _time_field(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ReplayProtocolError(ErrorReason.BAD_FIELD, f"{name} must be a non-negative number of seconds, "
                                  f"not {value!r}")
    return float(value)


def parse_writer_message(frames: Sequence[Any]) -> Request | Credit | SetStop | Close:
    """Frames from a writer (without the ROUTER identity) -> message; ReplayProtocolError if malformed."""
    if len(frames) != 1:
        raise ReplayProtocolError(ErrorReason.BAD_FRAMES, f"expected 1 frame, got {len(frames)}")
    body = _load_object(frames[0])
    kind = body.get("type")
    if kind == "request":
        version = body.get("version", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
            raise ReplayProtocolError(ErrorReason.UNSUPPORTED_VERSION,
                                      f"protocol version {version!r} is not supported (use {PROTOCOL_VERSION})")
        start_pulse_id = _pulse_id_field(body, "start_pulse_id")
        start_time = _time_field(body, "start_time")
        if (start_pulse_id is None) == (start_time is None):
            raise ReplayProtocolError(ErrorReason.BAD_FIELD, "give exactly one of start_pulse_id and start_time")
        stop_pulse_id = _pulse_id_field(body, "stop_pulse_id")
        stop_time = _time_field(body, "stop_time")
        if start_pulse_id is not None and stop_pulse_id is not None and stop_pulse_id < start_pulse_id:
            raise ReplayProtocolError(ErrorReason.BAD_FIELD,
                                      f"stop_pulse_id {stop_pulse_id} is before start_pulse_id {start_pulse_id}")
        if start_time is not None and stop_time is not None and stop_time < start_time:
            raise ReplayProtocolError(ErrorReason.BAD_FIELD, f"stop_time {stop_time} is before start_time {start_time}")
        window = body.get("window", DEFAULT_WINDOW)
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
            raise ReplayProtocolError(ErrorReason.BAD_FIELD, f"window must be an integer 1..{MAX_WINDOW}, not {window!r}")
        return Request(start_pulse_id, start_time, stop_pulse_id, stop_time, window)
    if kind == "credit":
        received = body.get("received")
        if isinstance(received, bool) or not isinstance(received, int) or received < 0:
            raise ReplayProtocolError(ErrorReason.BAD_FIELD, f"received must be a non-negative integer, not {received!r}")
        return Credit(received)
    if kind == "stop":
        return SetStop(_pulse_id_field(body, "stop_pulse_id"), _time_field(body, "stop_time"))
    if kind == "close":
        return Close()
    raise ReplayProtocolError(ErrorReason.UNKNOWN_TYPE, f"unknown message type {kind!r} "
                              "(request, credit, stop, close)")


# ---------------------------------------------------------------------------
# Buffer -> writer
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Data:
    """One bsread message, as the original frames (main header, data header, values...)."""

    pulse_id: int
    frames: list = field(repr=False)


@dataclass(frozen=True)
class Gap:
    """Messages that will never come. Pulse ids are as far as known (None: unknown); count None: unknown."""

    first_pulse_id: int | None
    last_pulse_id: int | None
    reason: str
    count: int | None


@dataclass(frozen=True)
class End:
    """The session is complete: the stop was reached. Nothing follows."""

    reason: str
    last_pulse_id: int | None


@dataclass(frozen=True)
class BufferLost:
    """Nothing (not even a heartbeat) heard from the buffer for this long; the client re-requests."""

    seconds_silent: float


@dataclass(frozen=True)
class Error:
    """The buffer refused a message (e.g. a malformed request)."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Accepted:
    """The buffer accepted a request (internal to the client)."""

    window: int
    oldest_pulse_id: int | None
    newest_pulse_id: int | None


@dataclass(frozen=True)
class Heartbeat:
    """The buffer is alive but has nothing to send (internal to the client)."""

    oldest_pulse_id: int | None
    newest_pulse_id: int | None


ReplayEvent = Data | Gap | End | BufferLost | Error


def data_kind(pulse_id: int) -> bytes:
    """The kind frame of a data message; it carries the pulse id so that the client need not parse JSON."""
    return b"data %d" % pulse_id


def build_data(pulse_id: int, frames: Sequence[Any]) -> list[Any]:
    return [data_kind(pulse_id), *frames]


def build_gap(gap: Gap) -> list[bytes]:
    return [KIND_GAP, _dumps({"first_pulse_id": gap.first_pulse_id, "last_pulse_id": gap.last_pulse_id,
                              "reason": getattr(gap.reason, "value", gap.reason), "count": gap.count})]


def build_end(end: End) -> list[bytes]:
    return [KIND_END, _dumps({"reason": getattr(end.reason, "value", end.reason), "last_pulse_id": end.last_pulse_id})]


def build_heartbeat(heartbeat: Heartbeat) -> list[bytes]:
    return [KIND_HEARTBEAT, _dumps({"oldest_pulse_id": heartbeat.oldest_pulse_id,
                                    "newest_pulse_id": heartbeat.newest_pulse_id})]


def build_error(reason: ErrorReason | str, detail: str) -> list[bytes]:
    return [KIND_ERROR, _dumps({"reason": getattr(reason, "value", reason), "detail": detail})]


def build_accepted(accepted: Accepted) -> list[bytes]:
    return [KIND_ACCEPTED, _dumps({"window": accepted.window, "oldest_pulse_id": accepted.oldest_pulse_id,
                                   "newest_pulse_id": accepted.newest_pulse_id})]


def _optional_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ReplayProtocolError(ErrorReason.BAD_FIELD, f"{name} must be an integer or null, not {value!r}")
    return value


def parse_buffer_message(frames: Sequence[Any]) -> Data | Gap | End | Error | Accepted | Heartbeat:
    """Frames from the buffer -> event; ReplayProtocolError if malformed. Data frames stay as received."""
    if not frames:
        raise ReplayProtocolError(ErrorReason.BAD_FRAMES, "empty message")
    kind = _frame_bytes(frames[0])
    if kind.startswith(b"data "):
        try:
            pulse_id = int(kind[5:])
        except ValueError:
            raise ReplayProtocolError(ErrorReason.BAD_FIELD, f"bad data kind frame {kind[:40]!r}") from None
        return Data(pulse_id, list(frames[1:]))
    if len(frames) != 2:
        raise ReplayProtocolError(ErrorReason.BAD_FRAMES, f"{kind[:20]!r}: expected 2 frames, got {len(frames)}")
    body = _load_object(frames[1])
    if kind == KIND_GAP:
        count = _optional_int(body, "count")
        return Gap(_optional_int(body, "first_pulse_id"), _optional_int(body, "last_pulse_id"),
                   str(body.get("reason", "")), count)
    if kind == KIND_END:
        return End(str(body.get("reason", "")), _optional_int(body, "last_pulse_id"))
    if kind == KIND_HEARTBEAT:
        return Heartbeat(_optional_int(body, "oldest_pulse_id"), _optional_int(body, "newest_pulse_id"))
    if kind == KIND_ERROR:
        return Error(str(body.get("reason", "")), str(body.get("detail", "")))
    if kind == KIND_ACCEPTED:
        return Accepted(int(body.get("window", DEFAULT_WINDOW)), _optional_int(body, "oldest_pulse_id"),
                        _optional_int(body, "newest_pulse_id"))
    raise ReplayProtocolError(ErrorReason.UNKNOWN_TYPE, f"unknown kind {kind[:20]!r}")


# ---------------------------------------------------------------------------
# Server side: one writer's session (pure)
# ---------------------------------------------------------------------------
class RingView(Protocol):
    """What a session needs from ring.Ring (see docs/architecture.md)."""

    first_seq: int
    next_seq: int
    oldest_pulse_id: int | None
    newest_pulse_id: int | None

    def frames(self, seq: int) -> list: ...
    def pulse_id(self, seq: int) -> int: ...
    def timestamp(self, seq: int) -> float: ...
    def seek(self, seq: int) -> int: ...
    def seq_for_pulse_id(self, pulse_id: int) -> int: ...
    def seq_for_time(self, t: float) -> int: ...


class ReplaySession:
    """One writer's cursor over the ring, and everything owed to it.

    Pure: the buffer calls :meth:`on_message` with what the writer sent and
    :meth:`poll` with the ring and the clock, and sends what ``poll``
    returns, in order. Guarantees:

    - at most ``window`` :class:`Data` in flight (sent, not yet reported
      consumed by a :class:`Credit`);
    - messages in ring order, each at most once; a :class:`Gap` before the
      first message after any loss (coalesced: one gap per hole);
    - :class:`End` after the stop (inclusive) and nothing afterwards;
    - a :class:`Heartbeat` when nothing else was sent for ``heartbeat_interval``.
    """

    def __init__(self, session_id: str, request: Request, ring: RingView, now: float,
                 heartbeat_interval: float = 1.0) -> None:
        self.session_id = session_id
        self.request = request
        self.window = min(request.window, MAX_WINDOW)
        self.start_pulse_id = request.start_pulse_id
        self.start_time = request.start_time
        self.stop_pulse_id = request.stop_pulse_id
        self.stop_time = request.stop_time
        self.heartbeat_interval = heartbeat_interval
        self.created = now
        self.last_heard = now
        self.last_sent = now
        self.sent = 0  # data messages sent
        self.acked = 0  # data messages the writer reports consumed
        self.gaps = 0
        self.lost = 0  # messages reported lost (where known)
        self.last_pulse_id: int | None = None  # last pulse id sent
        self.ended: End | None = None
        self._started = False  # first message at/after the start found
        self._order_pulse_id: int | None = None  # for detecting a pulse-id restart without loss
        self._resets_seen = _ring_resets(ring)
        self._pending: list[Any] = []  # control messages owed before the next data
        if request.start_pulse_id is not None:
            self.cursor = ring.seq_for_pulse_id(request.start_pulse_id)
            oldest = _oldest_pulse_id(ring)
            if oldest is not None and request.start_pulse_id < oldest:
                self._add_gap(Gap(request.start_pulse_id, oldest - 1, GapReason.BEFORE_BUFFER.value, None), None)
        else:
            assert request.start_time is not None
            self.cursor = ring.seq_for_time(request.start_time)
            if ring.first_seq < ring.next_seq and request.start_time < ring.timestamp(ring.first_seq):
                oldest = ring.pulse_id(ring.first_seq)
                self._add_gap(Gap(None, oldest - 1, GapReason.BEFORE_BUFFER.value, None), None)

    # -- input from the writer --------------------------------------------
    def on_message(self, message: Credit | SetStop, now: float) -> None:
        self.last_heard = now
        if isinstance(message, Credit):
            # Cumulative, so a lost or duplicated credit cannot inflate the window.
            self.acked = max(self.acked, min(message.received, self.sent))
        elif isinstance(message, SetStop):
            self.stop_pulse_id = message.stop_pulse_id
            self.stop_time = message.stop_time

    @property
    def in_flight(self) -> int:
        return self.sent - self.acked

    def expired(self, now: float, timeout: float) -> bool:
        return now - self.last_heard > timeout

    def has_work(self, ring: RingView) -> bool:
        """True if poll() would send something now (used to decide whether the loop may sleep)."""
        if self.ended is not None:
            return False
        return bool(self._pending) or (self.in_flight < self.window and self.cursor < ring.next_seq)

    # -- output to the writer ---------------------------------------------
    def _add_gap(self, gap: Gap, lost: int | None) -> None:
        self._pending.append(gap)
        self.gaps += 1
        if lost:
            self.lost += lost

    def _end(self, reason: EndReason) -> None:
        self.ended = End(reason.value, self.last_pulse_id)
        self._pending.append(self.ended)

    def _catch_up(self, ring: RingView) -> None:
        """Messages vanished under the cursor: report them and move to the next message held.

        They vanish by eviction (the cursor fell below ``first_seq``) or by a
        pulse-id reset (the ring drops its tail, leaving a hole of seqs).
        Seqs are never reused, so the count of lost messages is exact.
        """
        resets = _ring_resets(ring)
        reset = resets != self._resets_seen
        self._resets_seen = resets
        if self.cursor >= ring.next_seq:
            return
        target = ring.seek(self.cursor)
        if target == self.cursor:
            return
        lost = target - self.cursor
        self.cursor = target
        next_pulse_id = ring.pulse_id(target) if target < ring.next_seq else None
        first = self.last_pulse_id + 1 if self.last_pulse_id is not None else self.start_pulse_id
        if reset or (next_pulse_id is not None and self._order_pulse_id is not None
                     and next_pulse_id <= self._order_pulse_id):
            # Lost messages carried the old numbering: their last pulse id is unknown.
            self._add_gap(Gap(first, None, GapReason.SOURCE_RESET.value, lost), lost)
            self._order_pulse_id = None
        else:
            last = next_pulse_id - 1 if next_pulse_id is not None else None
            self._add_gap(Gap(first, last, GapReason.EVICTED.value, lost), lost)

    def poll(self, ring: RingView, now: float, budget: int = 32) -> list[Any]:
        """What to send now, in order: Gap/End/Heartbeat and Data(pulse_id, frames) events.

        ``budget`` bounds the ring entries looked at, so that one session
        cannot hold the buffer's loop for long.
        """
        out: list[Any] = []
        if self.ended is not None:
            return out
        if self.stop_pulse_id is not None and self.last_pulse_id is not None and self.last_pulse_id >= self.stop_pulse_id:
            self._end(EndReason.STOP_PULSE_ID)  # the stop was moved below what was already sent
        while budget > 0 and self.ended is None and self.in_flight < self.window:
            self._catch_up(ring)
            if self.cursor >= ring.next_seq:
                break
            budget -= 1
            pulse_id = ring.pulse_id(self.cursor)
            timestamp = ring.timestamp(self.cursor) if (self.stop_time is not None or self.start_time is not None) else 0.0
            if not self._started:
                # Only for a start in the future (live messages older than the start).
                if (self.start_pulse_id is not None and pulse_id < self.start_pulse_id) or \
                        (self.start_time is not None and timestamp < self.start_time):
                    self.cursor += 1
                    continue
                self._started = True
            if self.stop_pulse_id is not None and pulse_id > self.stop_pulse_id:
                self._end(EndReason.STOP_PULSE_ID)
                break
            if self.stop_time is not None and timestamp > self.stop_time:
                self._end(EndReason.STOP_TIME)
                break
            if self._order_pulse_id is not None and pulse_id <= self._order_pulse_id:
                # Pulse ids went backwards without a loss for this writer: say so anyway.
                self._add_gap(Gap(None, None, GapReason.SOURCE_RESET.value, 0), 0)
            self._pending.append(Data(pulse_id, ring.frames(self.cursor)))
            self.cursor += 1
            self.sent += 1
            self.last_pulse_id = pulse_id
            self._order_pulse_id = pulse_id
            if self.stop_pulse_id is not None and pulse_id == self.stop_pulse_id:
                self._end(EndReason.STOP_PULSE_ID)  # inclusive: no need to wait for the next message
        if self._pending:
            out, self._pending = self._pending, []
        elif now - self.last_sent >= self.heartbeat_interval:
            out.append(Heartbeat(_oldest_pulse_id(ring), _newest_pulse_id(ring)))
        if out:
            self.last_sent = now
        return out

    def position(self) -> dict[str, Any]:
        """Plain-data summary for statistics."""
        return {
            "session": self.session_id,
            "start_pulse_id": self.start_pulse_id,
            "start_time": self.start_time,
            "stop_pulse_id": self.stop_pulse_id,
            "stop_time": self.stop_time,
            "cursor_seq": self.cursor,
            "last_pulse_id": self.last_pulse_id,
            "sent": self.sent,
            "in_flight": self.in_flight,
            "window": self.window,
            "gaps": self.gaps,
            "lost": self.lost,
            "ended": self.ended.reason if self.ended else None,
        }


def _ring_resets(ring: Any) -> int:
    counters = getattr(ring, "counters", None)
    return int(getattr(counters, "resets", 0)) if counters is not None else 0


def _oldest_pulse_id(ring: Any) -> int | None:
    return ring.oldest_pulse_id


def _newest_pulse_id(ring: Any) -> int | None:
    return ring.newest_pulse_id


# ---------------------------------------------------------------------------
# Client side (writer)
# ---------------------------------------------------------------------------
class ReplayClient:
    """The writer's end of the replay protocol (a DEALER socket).

    ``receive`` returns :class:`Data`, :class:`Gap`, :class:`End`,
    :class:`BufferLost` or :class:`Error`; it grants credit as the caller
    consumes Data and sends a heartbeat at least every
    ``heartbeat_interval`` while the caller keeps calling it. Call it at
    least that often (the buffer expires a writer silent for its session
    timeout, 10 s by default).

    If the buffer is silent for ``peer_timeout``, ``receive`` returns
    :class:`BufferLost` once and re-requests the rest of the range on a new
    socket (from the pulse after the last one received), so a restarted
    buffer continues the stream. The same happens when the buffer answers
    ``unknown_session`` (it restarted and forgot the writer). Not thread-safe:
    use from one thread.
    """

    def __init__(self, address: str, start_pulse_id: int | None = None, start_time: float | None = None,
                 stop_pulse_id: int | None = None, stop_time: float | None = None, window: int = DEFAULT_WINDOW,
                 heartbeat_interval: float = 1.0, peer_timeout: float = 5.0,
                 context: zmq.Context | None = None) -> None:
        if (start_pulse_id is None) == (start_time is None):
            raise ValueError("give exactly one of start_pulse_id and start_time")
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be 1..{MAX_WINDOW}")
        self.address = address
        self.start_pulse_id = start_pulse_id
        self.start_time = start_time
        self.stop_pulse_id = stop_pulse_id
        self.stop_time = stop_time
        self.window = window
        self.heartbeat_interval = heartbeat_interval
        self.peer_timeout = peer_timeout
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._received = 0  # Data returned to the caller in this session
        self._credited = 0  # last cumulative count reported
        self._last_credit_time = 0.0
        self._last_heard = 0.0
        self.last_pulse_id: int | None = None  # last Data pulse id returned
        self.ended: End | None = None
        self.accepted: Accepted | None = None
        self.restarts = 0  # re-requests after a lost buffer / forgotten session
        self._credit_step = max(1, window // 4)
        self._zero_copy = True  # how to receive the next message, see _recv_frames

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "ReplayClient":
        self._open()
        self._send(build_request(Request(self.start_pulse_id, self.start_time, self.stop_pulse_id,
                                         self.stop_time, self.window)))
        return self

    def _open(self) -> None:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        # In flight is bounded by the window: no receive limit needed here.
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.connect(self.address)
        self._socket = socket
        self._received = 0
        self._credited = 0
        now = time.monotonic()
        self._last_heard = now
        self._last_credit_time = now

    def _send(self, frames: list[bytes]) -> None:
        assert self._socket is not None, "start() first"
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            # Not connected yet or the buffer is gone: the heartbeat/timeout logic copes.
            logger.debug("replay: could not send to %s now", self.address)

    def _restart(self) -> None:
        """Re-request the rest of the range on a fresh socket (stale in-flight messages die with the old one)."""
        self.restarts += 1
        if self._socket is not None:
            self._socket.close(linger=0)
        self._open()
        if self.last_pulse_id is not None:
            start_pulse_id, start_time = self.last_pulse_id + 1, None
        else:
            start_pulse_id, start_time = self.start_pulse_id, self.start_time
        self._send(build_request(Request(start_pulse_id, start_time, self.stop_pulse_id, self.stop_time,
                                         self.window)))

    def set_stop(self, stop_pulse_id: int | None = None, stop_time: float | None = None) -> None:
        """Move the stop of the running session (inclusive); None removes that stop."""
        self.stop_pulse_id = stop_pulse_id
        self.stop_time = stop_time
        self._send(build_set_stop(stop_pulse_id, stop_time))

    def close(self) -> None:
        """Tell the buffer (best effort) and close the socket; safe to call twice."""
        if self._socket is None:
            return
        if self.ended is None:
            self._send(build_close())
        self._socket.close(linger=0)
        self._socket = None

    def __enter__(self) -> "ReplayClient":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- receiving ---------------------------------------------------------
    def _grant(self, now: float, force: bool = False) -> None:
        if self.ended is not None:
            return
        if force or self._received - self._credited >= self._credit_step or \
                now - self._last_credit_time >= self.heartbeat_interval:
            self._send(build_credit(self._received))
            self._credited = self._received
            self._last_credit_time = now

    def _recv_frames(self) -> list[Any]:
        """One whole multipart message, as ``zmq.Frame`` (zero-copy) or ``bytes`` parts.

        Why not ``recv_multipart(copy=False)``: a ``zmq.Frame`` per part costs
        about twice a small ``bytes`` object, so for a 500-channel message
        (1002 parts of 8-16 bytes) zero-copy made the client the bottleneck
        of a replay; for a camera message (one 2.6 MB part) copying would
        cost a memcpy and fresh pages per image instead. Part sizes are only
        known once received, so the previous message decides, as pyzmq does
        for sends: zero-copy when its parts averaged at least
        ``zmq.COPY_THRESHOLD`` (64 KiB) bytes. A stream's shape rarely
        changes, and a wrong guess only costs time, never content: both
        kinds of part hold exactly the bytes sent.
        """
        socket = self._socket
        copy = not self._zero_copy
        parts = [_raw_recv(socket, 0, copy)]
        while _raw_get(socket, _RCVMORE):
            parts.append(_raw_recv(socket, 0, copy))
        if len(parts) > 2:  # data only: control messages are 2 small parts
            self._zero_copy = sum(map(len, parts)) >= zmq.COPY_THRESHOLD * len(parts)
        return parts

    def receive(self, timeout: float) -> ReplayEvent | None:
        """The next event, or None if nothing arrived within ``timeout`` seconds."""
        assert self._socket is not None, "start() first"
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            self._grant(now)
            wait = max(0.0, min(deadline - now, self.heartbeat_interval / 2))
            if not self._socket.poll(int(wait * 1000)):
                now = time.monotonic()
                # Only silence counts: messages waiting unread are not the buffer's fault.
                if self.ended is None and now - self._last_heard > self.peer_timeout:
                    silent = now - self._last_heard
                    logger.warning("replay: buffer %s silent for %.1f s; re-requesting", self.address, silent)
                    self._restart()
                    return BufferLost(silent)
                if now >= deadline:
                    return None
                continue
            frames = self._recv_frames()
            self._last_heard = time.monotonic()
            try:
                event = parse_buffer_message(frames)
            except ReplayProtocolError as error:
                logger.warning("replay: malformed message from buffer dropped: %s", error)
                continue
            if self.ended is not None:
                continue  # nothing after End counts
            if isinstance(event, Data):
                self._received += 1
                self.last_pulse_id = event.pulse_id
                self._grant(self._last_heard)
                return event
            if isinstance(event, (Heartbeat,)):
                continue
            if isinstance(event, Accepted):
                self.accepted = event
                continue
            if isinstance(event, End):
                self.ended = event
                return event
            if isinstance(event, Error) and event.reason == ErrorReason.UNKNOWN_SESSION.value:
                logger.warning("replay: buffer %s forgot this session; re-requesting", self.address)
                self._restart()
                continue
            return event  # Gap or Error
