"""The replay protocol's wire messages: Python values <-> frames, both directions (pure).

The replay protocol connects the buffer (a ROUTER) with its writers (one
DEALER each); the full description with its rationale is
docs/replay-protocol.md. This module is its vocabulary: every message is a
small frozen dataclass, ``build_*`` turns one into frames and
:func:`parse_writer_message` / :func:`parse_buffer_message` turn frames back
into one, raising :class:`ReplayProtocolError` for anything malformed. No
socket, thread or clock is involved, so the protocol is unit-tested by
feeding frames. The two sides that speak it:

* :mod:`.replay_session` (pure): the buffer's side of one session, which
  decides what to send a writer next;
* :mod:`.replay_client` (pure): the writer's side, which decides when to
  grant credit, send a heartbeat and re-request after a lost buffer;
  ``replay.client.ReplayClient`` is its socket.

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
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MissingRange",
    "PROTOCOL_VERSION",
    "DEFAULT_WINDOW",
    "MAX_WINDOW",
    "MAX_WRITER_MESSAGE_BYTES",
    "GapReason",
    "EndReason",
    "ErrorReason",
    "ReplayProtocolError",
    "Request",
    "make_label",
    "MAX_LABEL_CHARACTERS",
    "Credit",
    "SetStop",
    "CloseSession",
    "Data",
    "Gap",
    "End",
    "BufferLost",
    "Refused",
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
    "parse_buffer_parts",
]

PROTOCOL_VERSION = 1
DEFAULT_WINDOW = 64
# A writer may not ask for more than this many messages in flight: together
# with the ring's own bound it caps what one writer can pin in memory.
MAX_WINDOW = 4096
#: A writer's message is one small JSON object (a request is ~150 bytes); a
#: larger one is refused unparsed, so no input can make the buffer parse much.
MAX_WRITER_MESSAGE_BYTES = 4096
#: Longest archive address an acceptance may name (nats://host:port,.../NAME).
MAX_ARCHIVE_ADDRESS = 1024

# First frame of every buffer -> writer message.
KIND_DATA = b"data"  # b"data <pulse_id> <time>", followed by the original frames
KIND_ACCEPTED = b"accepted"
KIND_GAP = b"gap"
KIND_END = b"end"
KIND_HEARTBEAT = b"heartbeat"
KIND_ERROR = b"error"


class GapReason(str, enum.Enum):
    """Why messages a writer asked for will never come."""

    EVICTED = "evicted"  # the ring overtook the writer's cursor (writer too slow)
    BEFORE_BUFFER = "before_buffer"  # the requested start lies before the oldest message held
    # From a buffer's archive (archive.records):
    BEFORE_ARCHIVE = "before_archive"  # older than the oldest message the archive holds
    NOT_ARCHIVED = "not_archived"  # the ring lost them before the archiver stored them (counted by the buffer)
    ARCHIVE_DISCARDED = "archive_discarded"  # removed by the archive's retention while a reader was on its way
    SOURCE_RESET = "source_reset"  # the source restarted its pulse ids (count may be 0)
    # Larger than the writer takes (its request's max_message_bytes): not sent. From a writer's own client
    # (pulse ids unknown): a part over its socket's bound refused by ZeroMQ (replay.client).
    OVERSIZE = "oversize"


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
    TOO_MANY_SESSIONS = "too_many_sessions"  # the buffer serves its most writers already


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
    # Ask for each message's time in its kind frame (``data <pulse_id> <time>``). An
    # extension within version 1: a buffer that does not know it ignores it (and sends
    # ``data <pulse_id>``), and a writer that does not ask gets what it always got.
    message_times: bool = False
    # What the session is for, shown in the buffer's status (a writer sends its output file). An optional
    # extension within version 1 as well: a buffer that does not know it ignores it. At most
    # MAX_LABEL_CHARACTERS printable characters; anything else is refused as bad_field.
    label: str | None = None
    # The largest message the writer takes (its --max-message-bytes): the buffer sends a larger one as a
    # gap (``oversize``) in its place, never its bytes. An optional extension within version 1: a buffer that
    # does not know it ignores it (the writer's socket bound then refuses what is far larger: replay.client).
    max_message_bytes: int | None = None


#: The longest label a request may carry (a file path; longer is not a label but a misuse).
MAX_LABEL_CHARACTERS = 1024


def make_label(text: str) -> str:
    """Any text as a valid label: unprintable characters as ``?``, a long one cut to its end (a path's tail
    names the file)."""
    printable = "".join(character if character.isprintable() else "?" for character in text) or "?"
    return printable if len(printable) <= MAX_LABEL_CHARACTERS else "..." + printable[-(MAX_LABEL_CHARACTERS - 3):]


def _label_field(body: dict[str, Any]) -> str | None:
    label = body.get("label")
    if label is None:
        return None
    if not isinstance(label, str) or not 0 < len(label) <= MAX_LABEL_CHARACTERS or not label.isprintable():
        raise ReplayProtocolError(ErrorReason.BAD_FIELD, f"label must be 1..{MAX_LABEL_CHARACTERS} printable "
                                                         f"characters, not {repr(label)[:60]}")
    return label


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
class CloseSession:
    """The writer is done; the buffer forgets the session."""


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def build_request(request: Request) -> list[bytes]:
    body: dict[str, Any] = {"type": "request", "version": PROTOCOL_VERSION, "window": request.window}
    for name in ("start_pulse_id", "start_time", "stop_pulse_id", "stop_time"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.message_times:
        body["message_times"] = True
    if request.label is not None:
        body["label"] = request.label
    if request.max_message_bytes is not None:
        body["max_message_bytes"] = request.max_message_bytes
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
    data = getattr(frame, "bytes", None)  # a zmq.Frame, without importing zmq
    return data if isinstance(data, bytes) else bytes(frame)


def _load_object(frame: Any, max_bytes: int | None = None) -> dict[str, Any]:
    """One JSON object; ReplayProtocolError for anything else, whatever the bytes (never RecursionError)."""
    if max_bytes is not None and len(frame) > max_bytes:
        raise ReplayProtocolError(ErrorReason.BAD_FRAMES, f"message of {len(frame)} bytes, at most {max_bytes}")
    try:
        body = json.loads(_frame_bytes(frame))
    except RecursionError:
        raise ReplayProtocolError(ErrorReason.NOT_JSON, "not JSON: nested too deeply") from None
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


def parse_writer_message(frames: Sequence[Any]) -> Request | Credit | SetStop | CloseSession:
    """Frames from a writer (without the ROUTER identity) -> message; ReplayProtocolError if malformed."""
    if len(frames) != 1:
        raise ReplayProtocolError(ErrorReason.BAD_FRAMES, f"expected 1 frame, got {len(frames)}")
    body = _load_object(frames[0], MAX_WRITER_MESSAGE_BYTES)
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
        message_times = body.get("message_times", False)
        if not isinstance(message_times, bool):
            raise ReplayProtocolError(ErrorReason.BAD_FIELD, f"message_times must be true or false, not {message_times!r}")
        max_message_bytes = body.get("max_message_bytes")
        if max_message_bytes is not None and (isinstance(max_message_bytes, bool) or
                                              not isinstance(max_message_bytes, int) or max_message_bytes < 1):
            raise ReplayProtocolError(ErrorReason.BAD_FIELD,
                                      f"max_message_bytes must be a positive integer, not {max_message_bytes!r}")
        return Request(start_pulse_id, start_time, stop_pulse_id, stop_time, window, message_times,
                       _label_field(body), max_message_bytes)
    if kind == "credit":
        received = body.get("received")
        if isinstance(received, bool) or not isinstance(received, int) or received < 0:
            raise ReplayProtocolError(ErrorReason.BAD_FIELD, f"received must be a non-negative integer, not {received!r}")
        return Credit(received)
    if kind == "stop":
        return SetStop(_pulse_id_field(body, "stop_pulse_id"), _time_field(body, "stop_time"))
    if kind == "close":
        return CloseSession()
    raise ReplayProtocolError(ErrorReason.UNKNOWN_TYPE, f"unknown message type {kind!r} "
                              "(request, credit, stop, close)")


# ---------------------------------------------------------------------------
# Buffer -> writer
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Data:
    """One bsread message, as the original frames (main header, data header, values...).

    ``pulse_id`` is the buffer's (from the kind frame); None from a plain
    live stream (``writer.direct``), whose frames carry it. ``time``: the
    time the buffer indexed the message by (``bsread.timebase``: the source's
    global timestamp, or the buffer's receive time where the source's is
    implausible); None from a plain stream or a buffer that does not say.
    """

    pulse_id: int | None
    frames: list = field(repr=False)
    time: float | None = None


@dataclass(frozen=True)
class Gap:
    """Messages that will never come. Pulse ids are as far as known (None: unknown); count None: unknown."""

    first_pulse_id: int | None
    last_pulse_id: int | None
    reason: str
    count: int | None


@dataclass(frozen=True)
class MissingRange:
    """Pulses that are not in the file, and why (one row of ``/missing``): what a writer makes of a :class:`Gap`,
    a pulse-id jump or a range end that never came. Beside ``Gap`` because both say "these pulses will never come".

    ``count`` is the number of pulses (messages) missing, which is not
    ``last - first + 1`` when the source's pulse step is larger than one.
    """

    first_pulse_id: int
    last_pulse_id: int
    count: int
    reason: str


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
class Refused:
    """The buffer refused a message of the writer (e.g. a malformed request); ``reason`` an ErrorReason value.

    An event, not an exception: the writer decides what a refusal means
    (``unknown_session`` is handled by the client itself; anything else ends
    the run).
    """

    reason: str
    detail: str


@dataclass(frozen=True)
class Accepted:
    """The buffer accepted a request (internal to the client)."""

    window: int
    oldest_pulse_id: int | None
    newest_pulse_id: int | None
    # The buffer's archive (nats://HOST:PORT/NAME) where it has one: pulses older than the ring are read
    # from there (archive.reach_back). An extension within version 1: older clients ignore the field.
    archive: str | None = None


@dataclass(frozen=True)
class Heartbeat:
    """The buffer is alive but has nothing to send (internal to the client)."""

    oldest_pulse_id: int | None
    newest_pulse_id: int | None


ReplayEvent = Data | Gap | End | BufferLost | Refused


def data_kind(pulse_id: int, time: float | None = None) -> bytes:
    """The kind frame of a data message: ``data <pulse_id> <time>``, so that the client need not parse JSON.

    ``time`` is written with ``repr`` (the shortest text that reads back as
    the same float), so the writer can tell the buffer's receive time from
    the source's timestamp by equality. A client also accepts ``data
    <pulse_id>`` alone (no time known).
    """
    if time is None or not math.isfinite(time):
        return b"data %d" % pulse_id
    return b"data %d %s" % (pulse_id, repr(float(time)).encode())


def build_data(pulse_id: int, frames: Sequence[Any], time: float | None = None) -> list[Any]:
    return [data_kind(pulse_id, time), *frames]


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
    body = {"window": accepted.window, "oldest_pulse_id": accepted.oldest_pulse_id,
            "newest_pulse_id": accepted.newest_pulse_id}
    if accepted.archive is not None:
        body["archive"] = accepted.archive
    return [KIND_ACCEPTED, _dumps(body)]


def _optional_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ReplayProtocolError(ErrorReason.BAD_FIELD, f"{name} must be an integer or null, not {value!r}")
    return value


def parse_buffer_message(frames: Sequence[Any]) -> Data | Gap | End | Refused | Accepted | Heartbeat:
    """Frames from the buffer -> event; ReplayProtocolError if malformed. Data frames stay as received."""
    if not frames:
        raise ReplayProtocolError(ErrorReason.BAD_FRAMES, "empty message")
    return parse_buffer_parts(frames[0], list(frames[1:]))


def parse_buffer_parts(kind_frame: Any, frames: Sequence[Any] | None) -> Data | Gap | End | Refused | Accepted | Heartbeat:
    """The kind frame and the rest of a message from the buffer -> event (ReplayProtocolError if malformed).

    The rest is whatever the receiver made of it (a list of frames, or a
    ``bsread.parts.PackedParts``): Data keeps it as it is, unparsed.
    """
    if kind_frame is None:
        raise ReplayProtocolError(ErrorReason.BAD_FRAMES, "empty message")
    frames = () if frames is None else frames
    kind = _frame_bytes(kind_frame)
    if kind.startswith(b"data "):
        fields = kind[5:].split(b" ")
        try:
            if len(fields) > 2:
                raise ValueError("too many fields")
            pulse_id = int(fields[0])
            time = float(fields[1]) if len(fields) == 2 else None
        except ValueError:
            raise ReplayProtocolError(ErrorReason.BAD_FIELD, f"bad data kind frame {kind[:60]!r}") from None
        if time is not None and not math.isfinite(time):
            raise ReplayProtocolError(ErrorReason.BAD_FIELD, f"data kind frame {kind[:60]!r}: time is not finite")
        return Data(pulse_id, frames, time)
    if len(frames) != 1:
        raise ReplayProtocolError(ErrorReason.BAD_FRAMES, f"{kind[:20]!r}: expected 2 frames, got {len(frames) + 1}")
    body = _load_object(frames[0])
    if kind == KIND_GAP:
        count = _optional_int(body, "count")
        return Gap(_optional_int(body, "first_pulse_id"), _optional_int(body, "last_pulse_id"),
                   str(body.get("reason", "")), count)
    if kind == KIND_END:
        return End(str(body.get("reason", "")), _optional_int(body, "last_pulse_id"))
    if kind == KIND_HEARTBEAT:
        return Heartbeat(_optional_int(body, "oldest_pulse_id"), _optional_int(body, "newest_pulse_id"))
    if kind == KIND_ERROR:
        return Refused(str(body.get("reason", "")), str(body.get("detail", "")))
    if kind == KIND_ACCEPTED:
        archive = body.get("archive")
        if archive is not None and (not isinstance(archive, str) or len(archive) > MAX_ARCHIVE_ADDRESS):
            raise ReplayProtocolError(ErrorReason.BAD_FIELD, "archive must be a short string or absent")
        return Accepted(int(body.get("window", DEFAULT_WINDOW)), _optional_int(body, "oldest_pulse_id"),
                        _optional_int(body, "newest_pulse_id"), archive)
    raise ReplayProtocolError(ErrorReason.UNKNOWN_TYPE, f"unknown kind {kind[:20]!r}")
