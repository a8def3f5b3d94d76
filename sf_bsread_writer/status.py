"""Typed status snapshots of the buffer and the writer, and their one JSON and one Prometheus rendering (pure).

A snapshot is a tree of frozen dataclasses. The service that owns the
counters builds a fresh one (the buffer's loop a few times a second, the
writer on each request) and every reader uses the types, never string
paths into a dict: the buffer's HTTP API, the CA gateway (which reads the
buffer's ``GET /statistics`` back with :meth:`BufferStatus.from_json`) and
the coming web service. Renaming a field is then a type error in every
reader, not a PV that silently goes into alarm.

The JSON field names are the ones users script against (docs/buffer.md,
"GET /statistics"; docs/writer.md, "GET /statistics"); field order is JSON
order.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sf_bsread_writer.bsread.spec import CHANNEL_REFUSAL_REASONS, RejectReason

__all__ = [
    "SOURCE_IDLE_SECONDS",
    "Endpoints",
    "SourceStatus",
    "CaFeedStatus",
    "ChildStatus",
    "ArchiveStatus",
    "RingStatus",
    "PulseIdStatus",
    "RateStatus",
    "SessionStatus",
    "ReplayStatus",
    "BufferStatus",
    "prometheus_text",
    "PrometheusText",
    "Record",
    "json_value",
]

# No message for this long: the status says the source is idle.
SOURCE_IDLE_SECONDS = 5.0


class Record:
    """JSON in and out for the snapshot dataclasses (nested records, tuples of records, None).

    The buffer's records are here; the writer's ``WriterStatistics`` (writer/statistics.py) is one too.
    """

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``json.dumps`` (nested records as dicts, tuples as lists)."""
        return {item.name: _to_json(getattr(self, item.name)) for item in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Any:
        """The record from :meth:`to_json`'s output; ValueError names a missing field.

        Fields this version does not know are ignored, so an older reader
        keeps working against a newer service; a field with a default may be
        absent (added later: a newer reader keeps working against an older service).
        """
        if not isinstance(document, Mapping):
            raise ValueError(f"{cls.__name__}: expected a JSON object, not {type(document).__name__}")
        hints = typing.get_type_hints(cls)
        values = {}
        for item in dataclasses.fields(cls):
            if item.name not in document:
                if item.default is not dataclasses.MISSING or item.default_factory is not dataclasses.MISSING:
                    continue  # a field newer than the service that answered: its default
                raise ValueError(f"{cls.__name__}: field {item.name!r} missing")
            values[item.name] = _from_json(hints[item.name], document[item.name], f"{cls.__name__}.{item.name}")
        return cls(**values)


def json_value(value: Any) -> Any:
    """Any snapshot value as plain JSON data: records as dicts, tuples as lists (e.g. for a file attribute)."""
    return _to_json(value)


def _to_json(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a plain record (MissingRange, Gap)
        return {field.name: _to_json(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_json(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _to_json(item) for key, item in value.items()}
    return value


def _from_json(hint: Any, value: Any, where: str) -> Any:
    """``value`` as the type ``hint`` says: a record, an optional record, a tuple of records, or as is."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        records = [arg for arg in typing.get_args(hint) if isinstance(arg, type) and issubclass(arg, Record)]
        return records[0].from_json(value) if records else value
    if origin is tuple:
        (item_hint, *_rest) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, not {type(value).__name__}")
        return tuple(_from_json(item_hint, item, where) for item in value)
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_json(value)
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):  # a plain record (MissingRange, Gap)
        return hint(**value)
    return value


# ---------------------------------------------------------------------------
# The buffer
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoints(Record):
    """Where the buffer listens (actual addresses: port 0 resolved)."""

    stream: str
    output: str | None
    replay: str | None
    rest: str | None
    web: str | None = None  # --web: the web service's base URL


@dataclass(frozen=True)
class SourceStatus(Record):
    address: str
    mode: str  # pull | sub
    idle_seconds: float | None  # since the last message; None before the first
    last_message_time: float | None  # the time of the last message stored (bsread.timebase)
    connected_once: bool  # a message has ever arrived
    # Messages whose time is the buffer's receive time: the source's timestamp was absent or implausible.
    timed_by_receive: int = 0
    clock_offset_seconds: float | None = None  # source timestamp - receive time, of the last message
    # Of those, messages whose global_timestamp was no time at all (NaN, negative, ns out of range,
    # beyond int64 ns: bsread.timebase.plausible_stamp): kept, their values stored, their time replaced.
    invalid_timestamps: int = 0
    # Connections to the source made anew after ZeroMQ gave one up: it refuses a part over twice
    # --max-message-bytes at its header and never connects again by itself (transport.connection).
    # The messages the source sent meanwhile are lost.
    reconnects: int = 0


@dataclass(frozen=True)
class CaFeedStatus(Record):
    """``--ca``/``--web``: the rate-limited loopback feed of the CA gateway or of the web service."""

    address: str
    max_rate: float
    sent: int


@dataclass(frozen=True)
class ChildStatus(Record):
    """A child service of the buffer (``ca_gateway`` for --ca, ``web`` for --web) and how it fares."""

    name: str
    running: bool
    restarts: int


@dataclass(frozen=True)
class ArchiveStatus(Record):
    """``--archive``: how the archiver (a child process, docs/archive.md) follows the ring into NATS JetStream.

    The archiver reports everything but ``lag_*``, which the buffer computes
    against its ring when it builds the snapshot. ``lost`` counts pulses
    the ring evicted (or the broker's absence outlasted) before they were
    archived; ``unarchived_at_start`` those between the archive's newest and
    the ring's oldest when the archiver (re)started. Neither is ever hidden:
    the archive holds a gap marker for each, which readers report as a gap
    with reason ``not_archived``.
    """

    url: str
    stream: str
    state: str  # starting | archiving | broker_unreachable | error | stopped
    error: str | None = None
    archived: int = 0  # messages stored (acknowledged by JetStream)
    archived_bytes: int = 0
    duplicates: int = 0  # stored before (a catch-up after a restart): dropped by JetStream's message id
    oversize: int = 0  # larger than the broker's max_payload: not archived, still in the ring
    refused: int = 0  # other publish failures the broker answered (each followed by a catch-up)
    lost: int = 0
    unarchived_at_start: int = 0
    reconnects: int = 0
    last_archived_pulse_id: int | None = None
    last_archived_time: float | None = None
    first_pulse_id: int | None = None  # of the archive as stored (retention moves it)
    last_pulse_id: int | None = None
    stored_messages: int | None = None
    stored_bytes: int | None = None
    discarded: int | None = None  # removed by retention (--archive-max-bytes/--archive-max-age), oldest first
    replicas: int | None = None
    lag_messages: int | None = None  # ring messages newer than the last archived one
    lag_seconds: float | None = None  # ring time of the newest message minus that of the last archived one


@dataclass(frozen=True)
class RingStatus(Record):
    messages: int
    bytes: int
    max_messages: int
    max_bytes: int
    oldest_pulse_id: int | None
    newest_pulse_id: int | None
    evicted: int
    evicted_bytes: int
    oldest_time: float | None = None  # the times the oldest/newest messages are indexed by (bsread.timebase)
    newest_time: float | None = None

    @property
    def look_back_seconds(self) -> float | None:
        """How far back the ring reaches: newest minus oldest message time."""
        if self.oldest_time is None or self.newest_time is None:
            return None
        return max(0.0, self.newest_time - self.oldest_time)

    @property
    def look_back_pulses(self) -> int | None:
        """Pulse ids the ring spans, both ends included (a 10 Hz stream at step 10 spans 10 per message)."""
        if self.oldest_pulse_id is None or self.newest_pulse_id is None:
            return None
        return self.newest_pulse_id - self.oldest_pulse_id + 1


@dataclass(frozen=True)
class PulseIdStatus(Record):
    last: int | None
    usual_step: int | None
    jumps: int
    jumped_pulses: int
    resets: int
    reset_evicted: int
    held_back: int
    out_of_order: int
    strays: int


@dataclass(frozen=True)
class RateStatus(Record):
    messages_per_second: float
    bytes_per_second: float
    window_seconds: float


@dataclass(frozen=True)
class SessionStatus(Record):
    """One writer's replay session (``replay.session.ReplaySession.status``)."""

    session: str
    start_pulse_id: int | None
    start_time: float | None
    stop_pulse_id: int | None
    stop_time: float | None
    cursor_seq: int
    last_pulse_id: int | None
    sent: int
    in_flight: int
    in_flight_bytes: int
    window: int
    gaps: int
    lost: int
    ended: str | None
    # Added later, absent in older buffers' answers (from_json then takes these defaults):
    label: str | None = None  # what the session is for: a writer's output file (its request's label)
    last_time: float | None = None  # the time of the last message sent (progress of a range by time)


@dataclass(frozen=True)
class ReplayStatus(Record):
    """Totals over every session since the start (active ones included) and the active sessions."""

    active_sessions: int
    started: int
    ended: int
    expired: int
    refused: int
    disconnected: int
    send_failures: int
    sent: int
    gaps: int
    lost: int
    sessions: tuple[SessionStatus, ...]


@dataclass(frozen=True)
class BufferStatus(Record):
    """Everything ``GET /statistics`` says about a buffer (field meanings: docs/buffer.md)."""

    name: str
    state: str  # running | stopping
    time: float  # wall clock of the snapshot
    uptime_seconds: float
    endpoints: Endpoints
    source: SourceStatus
    received: int
    received_bytes: int
    forwarded: int
    output_mode: str
    output_drops: int
    rejected: Mapping[str, int]  # by reason
    rejected_total: int
    ignored: int
    duplicates: int
    ca_feed: CaFeedStatus | None
    header_changes: int
    ring: RingStatus
    pulse_ids: PulseIdStatus
    rates: RateStatus
    replay: ReplayStatus
    io_path: str = "python"  # how whole messages move: compiled | python (transport.partsio)
    web_feed: CaFeedStatus | None = None
    channels: int | None = None  # channels of the newest data header
    children: tuple[ChildStatus, ...] = ()
    # Channel values of stored messages refused by their data-header entry (ChannelSpec.refused), by
    # reason: that channel's value is lost, the message and its other channels are kept.
    refused_channel_values: Mapping[str, int] = field(default_factory=dict)
    archive: ArchiveStatus | None = None

    def describe(self) -> str:
        """One word for humans and monitoring: what the buffer is doing."""
        if self.state == "stopping":
            return "stopping"
        if not self.source.connected_once:
            return "waiting_for_source"
        idle = self.source.idle_seconds
        if idle is not None and idle > SOURCE_IDLE_SECONDS:
            return "source_idle"
        return "receiving"

    def status_answer(self) -> dict[str, Any]:
        """``GET /status``: a short answer for health checks."""
        return {
            "state": "ok",
            "status": self.describe(),
            "name": self.name,
            "uptime_seconds": self.uptime_seconds,
            "source_idle_seconds": self.source.idle_seconds,
            "newest_pulse_id": self.ring.newest_pulse_id,
            "oldest_pulse_id": self.ring.oldest_pulse_id,
            "replay_sessions": self.replay.active_sessions,
            "endpoints": self.endpoints.to_json(),
            "io_path": self.io_path,
        }

    def status_pv_values(self) -> dict[str, Any]:
        """What the CA gateway's ``NAME:...`` status PVs show, by PV suffix (docs/gateway.md)."""
        return {
            "PULSE_ID": self.ring.newest_pulse_id,
            "OLDEST_PULSE_ID": self.ring.oldest_pulse_id,
            "RATE": self.rates.messages_per_second,
            "N_MESSAGES": self.ring.messages,
            "RECEIVED": self.received,
            "REJECTED": self.rejected_total,
            "IDLE_S": self.source.idle_seconds,
            "N_WRITERS": self.replay.active_sessions,
            "STATE": self.describe(),
        }

    def statistics_answer(self) -> dict[str, Any]:
        """``GET /statistics``: the whole snapshot."""
        return {"state": "ok", "status": self.describe(), "statistics": self.to_json()}


# ---------------------------------------------------------------------------
# Prometheus text exposition format 0.0.4
# ---------------------------------------------------------------------------
_PREFIX = "sf_bsread_buffer_"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items()) + "}"


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class PrometheusText:
    """Builds one Prometheus text exposition: metric families named ``prefix + name``, base labels on all."""

    def __init__(self, base_labels: Mapping[str, Any], prefix: str = _PREFIX) -> None:
        self.base = dict(base_labels)
        self.prefix = prefix
        self.lines: list[str] = []

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[Mapping[str, Any], Any]]) -> None:
        samples = [(labels, value) for labels, value in samples if value is not None]
        full = self.prefix + name
        self.lines.append(f"# HELP {full} {help_text}")
        self.lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            self.lines.append(f"{full}{_labels({**self.base, **labels})} {_number(value)}")

    def one(self, name: str, kind: str, help_text: str, value: Any) -> None:
        self.family(name, kind, help_text, [({}, value)])


def prometheus_text(status: BufferStatus) -> str:
    """``GET /metrics``: the snapshot as Prometheus metrics (label ``buffer`` = the buffer's name)."""
    m = PrometheusText({"buffer": status.name})
    ring, replay, pulse_ids = status.ring, status.replay, status.pulse_ids
    m.one("up", "gauge", "1 while the buffer runs.", 1)
    m.one("uptime_seconds", "gauge", "Seconds since the buffer started.", status.uptime_seconds)
    m.one("received_messages_total", "counter", "Valid messages received and stored.", status.received)
    m.one("received_bytes_total", "counter", "Bytes of valid messages received.", status.received_bytes)
    m.one("forwarded_messages_total", "counter", "Messages handed to the live output.", status.forwarded)
    m.one("output_drops_total", "counter",
          "Messages the live output could not take (PUSH at high-water mark; PUB drops are invisible).",
          status.output_drops)
    # Every reason from the start, at 0: an alert on increase() needs the series before the first reject.
    rejected = {reason.value: 0 for reason in RejectReason} | dict(status.rejected)
    m.family("rejected_messages_total", "counter", "Malformed messages dropped, by reason.",
             [({"reason": reason}, count) for reason, count in sorted(rejected.items())])
    refused = {reason.value: 0 for reason in CHANNEL_REFUSAL_REASONS} | dict(status.refused_channel_values)
    m.family("refused_channel_values_total", "counter",
             "Channel values of stored messages refused by their data-header entry, by reason (the rest kept).",
             [({"reason": reason}, count) for reason, count in sorted(refused.items())])
    m.one("source_timed_by_receive_total", "counter",
          "Messages timed by the buffer's receive time (source timestamp absent or implausible).",
          status.source.timed_by_receive)
    m.one("source_invalid_timestamps_total", "counter",
          "Messages whose global timestamp was no time (kept; timed by the receive time).",
          status.source.invalid_timestamps)
    m.one("source_reconnects_total", "counter",
          "Connections to the source made anew after ZeroMQ gave one up (a part over twice the size limit).",
          status.source.reconnects)
    m.one("ignored_messages_total", "counter", "Control messages (htype not bsr_m-*) ignored.", status.ignored)
    m.one("duplicate_messages_total", "counter", "Messages dropped because their pulse id repeated the newest.",
          status.duplicates)
    m.one("header_changes_total", "counter", "Changes of the data header hash.", status.header_changes)
    m.one("channels", "gauge", "Channels of the newest data header.", status.channels)
    m.one("ring_messages", "gauge", "Messages held in the ring.", ring.messages)
    m.one("ring_bytes", "gauge", "Bytes of raw frames held in the ring.", ring.bytes)
    m.one("ring_max_messages", "gauge", "Most messages the ring holds.", ring.max_messages)
    m.one("ring_max_bytes", "gauge", "Most bytes the ring holds.", ring.max_bytes)
    m.one("ring_evicted_messages_total", "counter", "Messages evicted from the ring.", ring.evicted)
    m.one("ring_evicted_bytes_total", "counter", "Bytes evicted from the ring.", ring.evicted_bytes)
    m.one("oldest_pulse_id", "gauge", "Oldest pulse id held.", ring.oldest_pulse_id)
    m.one("newest_pulse_id", "gauge", "Newest pulse id held.", ring.newest_pulse_id)
    m.one("ring_look_back_seconds", "gauge", "Seconds between the oldest and the newest message held.",
          ring.look_back_seconds)
    m.one("pulse_id_jumps_total", "counter", "Pulse-id steps different from the usual step.", pulse_ids.jumps)
    m.one("pulse_id_resets_total", "counter", "Pulse ids going backwards (source restarts).", pulse_ids.resets)
    m.one("out_of_order_messages_total", "counter",
          "Backwards messages dropped because the stream went on above them.", pulse_ids.out_of_order)
    m.one("stray_messages_total", "counter",
          "Messages far ahead of the stream dropped because it did not follow them.", pulse_ids.strays)
    m.one("received_messages_per_second", "gauge", "Messages received per second (recent window).",
          status.rates.messages_per_second)
    m.one("received_bytes_per_second", "gauge", "Bytes received per second (recent window).",
          status.rates.bytes_per_second)
    m.one("source_idle_seconds", "gauge", "Seconds since the last message from the source.",
          status.source.idle_seconds)
    m.one("replay_sessions", "gauge", "Active replay sessions.", replay.active_sessions)
    m.one("replay_sessions_started_total", "counter", "Replay sessions accepted.", replay.started)
    m.one("replay_sessions_expired_total", "counter", "Replay sessions expired (silent writer).", replay.expired)
    m.one("replay_sessions_refused_total", "counter", "Replay requests refused (too many writers, bad request).",
          replay.refused)
    m.one("replay_sent_messages_total", "counter", "Data messages sent to writers.", replay.sent)
    m.one("replay_gaps_total", "counter", "Gap notices sent to writers.", replay.gaps)
    m.one("replay_lost_messages_total", "counter", "Messages reported lost to writers (where known).", replay.lost)
    sessions = replay.sessions
    m.family("replay_session_last_pulse_id", "gauge", "Last pulse id sent to a session.",
             [({"session": s.session}, s.last_pulse_id) for s in sessions])
    m.family("replay_session_sent_messages", "gauge", "Data messages sent to a session.",
             [({"session": s.session}, s.sent) for s in sessions])
    m.family("replay_session_in_flight", "gauge", "Data messages in flight to a session.",
             [({"session": s.session}, s.in_flight) for s in sessions])
    m.family("replay_session_lost_messages", "gauge", "Messages a session lost.",
             [({"session": s.session}, s.lost) for s in sessions])
    archive = status.archive
    if archive is not None:
        m.one("archive_up", "gauge", "1 while the archiver stores messages in JetStream.",
              archive.state == "archiving")
        m.one("archive_messages_total", "counter", "Messages stored in the archive.", archive.archived)
        m.one("archive_bytes_total", "counter", "Bytes stored in the archive.", archive.archived_bytes)
        m.one("archive_lost_pulses_total", "counter",
              "Pulses the ring lost before they were archived (evicted, or the broker away too long).", archive.lost)
        m.one("archive_unarchived_at_start_pulses_total", "counter",
              "Pulses between the archive's newest and the ring's oldest when the archiver started.",
              archive.unarchived_at_start)
        m.one("archive_oversize_messages_total", "counter", "Messages over the broker's max_payload (not archived).",
              archive.oversize)
        m.one("archive_duplicate_messages_total", "counter", "Messages archived before (dropped by JetStream).",
              archive.duplicates)
        m.one("archive_discarded_messages", "gauge", "Messages removed by the archive's retention.",
              archive.discarded)
        m.one("archive_lag_messages", "gauge", "Ring messages not archived yet.", archive.lag_messages)
        m.one("archive_lag_seconds", "gauge", "Ring time between the newest and the last archived message.",
              archive.lag_seconds)
        m.one("archive_first_pulse_id", "gauge", "Oldest pulse id in the archive.", archive.first_pulse_id)
        m.one("archive_last_pulse_id", "gauge", "Newest pulse id in the archive.", archive.last_pulse_id)
    m.family("child_up", "gauge", "1 while a child service of the buffer (--ca, --web) runs.",
             [({"child": child.name}, child.running) for child in status.children])
    m.family("child_restarts_total", "counter", "Restarts of a child service after it ended unexpectedly.",
             [({"child": child.name}, child.restarts) for child in status.children])
    return m.text()
