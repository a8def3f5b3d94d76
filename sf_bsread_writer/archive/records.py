"""The archive's vocabulary and decisions (pure): names, the stored form of a message, what a reader sends next.

The archive keeps every message a buffer's ring accepts in one NATS
JetStream stream per buffer (docs/archive.md). Everything here is pure (no
socket, thread, clock read or broker client), so the shells
(``archive.publisher``, ``archive.reader``, ``archive.reach_back``) stay
thin and the decisions are tested by feeding values:

* :class:`ArchiveTarget`: ``nats://HOST:PORT[,HOST:PORT...]/NAME`` -> the
  servers, the stream name and its subjects;
* :func:`encode_payload` / :func:`decode_payload`: the message's parts,
  byte-identical, in one JetStream payload (what the ring holds, packed);
* :func:`message_headers` / :func:`parse_headers`: the pulse id and the
  time in NATS headers, so that a reader finds a pulse without the payload;
  gap markers (pulses the ring lost before they were archived) use the
  same headers;
* :func:`settings_conflicts`: an existing stream of the same name whose
  settings would make it another archive (a clear error, never a silent
  reuse);
* :class:`RangeCursor`: a reader's range (start/stop by pulse id or time)
  over the stored records -> Data / Gap / End, the replay protocol's events,
  so a writer cannot tell the archive from a ring except by the gap reasons.

Why headers and not a key in the subject: a subject per pulse id would make
the stream's subject index grow with every message (JetStream keeps per
subject state), and a binary search over stream sequence numbers by the
``Sf-Pulse-Id`` header costs ~20 direct gets for a day of 100 Hz data.
"""
from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from sf_bsread_writer.bsread.parts import (
    HEADER,
    LENGTH_DTYPE,
    SMALL,
    LayoutCache,
    PackedParts,
)
from sf_bsread_writer.replay.messages import Data, End, EndReason, Gap, GapReason

__all__ = [
    "ARCHIVE_SCHEME", "HEADER_PULSE_ID", "HEADER_TIME", "HEADER_KIND", "HEADER_GAP_LAST", "HEADER_GAP_COUNT",
    "HEADER_GAP_REASON", "HEADER_MSG_ID", "PAYLOAD_MAGIC", "GAP_NOT_ARCHIVED", "GAP_BEFORE_ARCHIVE",
    "ArchiveTarget", "ArchivedRecord", "InvalidArchive", "encode_payload", "decode_payload", "PayloadDecoder",
    "message_headers",
    "gap_headers", "parse_headers", "message_id", "StreamSettings", "settings_conflicts", "RangeCursor",
    "PulseStep", "lost_pulses", "marker_range", "RING", "ARCHIVE", "REACHABLE_REASONS", "should_reach_back", "OriginLog",
]

ARCHIVE_SCHEME = "nats"
HEADER_PULSE_ID = "Sf-Pulse-Id"
HEADER_TIME = "Sf-Time"
HEADER_KIND = "Sf-Kind"  # "msg" (a bsread message) or "gap" (pulses lost before they were archived)
HEADER_GAP_LAST = "Sf-Gap-Last"
HEADER_GAP_COUNT = "Sf-Gap-Count"
HEADER_GAP_REASON = "Sf-Gap-Reason"
HEADER_MSG_ID = "Nats-Msg-Id"  # JetStream drops a second message with the same id (within its window)

#: First bytes of every stored message: the version of the byte form below.
PAYLOAD_MAGIC = b"SFBS1\n"
_COUNT = struct.Struct("<I")
# At most this many parts per message (a 500 000-channel message has 1 000 002): a corrupt count cannot
# make a reader allocate more than a few MB for the lengths.
MAX_PARTS = 2_000_002

#: Gap reasons the archive adds to the replay protocol's (replay.messages.GapReason).
GAP_NOT_ARCHIVED = GapReason.NOT_ARCHIVED.value  # the ring lost them before the archiver stored them (counted)
GAP_BEFORE_ARCHIVE = GapReason.BEFORE_ARCHIVE.value  # older than the archive's oldest (retention, or never)

# A JetStream stream name and a subject token: no dots, wildcards, spaces or path characters.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class InvalidArchive(ValueError):
    """An archive address, name or stored message that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class ArchiveTarget:
    """Where a buffer's archive lives: ``nats://HOST:PORT[,HOST:PORT...]/NAME``.

    ``servers`` are what the NATS client connects to (any one of a cluster
    suffices; more survive the loss of the first). ``name`` is the buffer's
    ``--name``; the JetStream stream is ``sfbs_<name>`` with subjects
    ``sfbs.<name>.msg`` (messages) and ``sfbs.<name>.gap`` (gap markers).
    """

    servers: tuple[str, ...]
    name: str

    @classmethod
    def parse(cls, url: str, name: str | None = None) -> "ArchiveTarget":
        """``nats://host:port[,[nats://]host:port]`` plus ``name`` (the buffer's), or ``.../NAME``."""
        text = url.strip()
        if not text.startswith(ARCHIVE_SCHEME + "://"):
            raise InvalidArchive(f"not an archive address: {url!r} (expected nats://HOST:PORT[/NAME])")
        # Each server may repeat the scheme (nats://a:4222,nats://b:4222/NAME), as NATS tools write lists.
        rest = ",".join(item.strip().removeprefix(ARCHIVE_SCHEME + "://") for item in text.split(","))
        hosts, _, path = rest.partition("/")
        path_name = path.strip("/")
        if path_name and name is not None and path_name != name:
            raise InvalidArchive(f"{url!r} names the archive {path_name!r}, but the buffer is {name!r}")
        final = path_name or name
        if not final:
            raise InvalidArchive(f"{url!r}: no archive name (nats://HOST:PORT/NAME, NAME = the buffer's --name)")
        check_name(final)
        servers = []
        for host in hosts.split(","):
            host = host.strip()
            try:
                parsed = urlsplit(f"{ARCHIVE_SCHEME}://{host}")
                port = parsed.port
            except ValueError:
                raise InvalidArchive(f"{url!r}: bad server {host!r}") from None
            if not parsed.hostname or port is None or parsed.path or parsed.query:
                raise InvalidArchive(f"{url!r}: bad server {host!r} (expected HOST:PORT)")
            servers.append(f"{ARCHIVE_SCHEME}://{host}")
        return cls(tuple(servers), final)

    @property
    def stream(self) -> str:
        return f"sfbs_{self.name}"

    @property
    def message_subject(self) -> str:
        return f"sfbs.{self.name}.msg"

    @property
    def gap_subject(self) -> str:
        return f"sfbs.{self.name}.gap"

    @property
    def subjects(self) -> tuple[str, ...]:
        return (f"sfbs.{self.name}.*",)

    def url(self) -> str:
        """The address a writer can be given (``nats://host:port,.../NAME``)."""
        return ",".join(self.servers) + "/" + self.name


def check_name(name: str) -> str:
    """A buffer name that can name a JetStream stream and a subject token (InvalidArchive otherwise)."""
    if not _NAME.fullmatch(name):
        raise InvalidArchive(f"the archive name {name!r} may use only letters, digits, '_' and '-' (1-64): "
                             "it names a JetStream stream and a subject")
    return name


# ---------------------------------------------------------------------------
# The stored form of one message
# ---------------------------------------------------------------------------
def _segments(layout: Any) -> tuple[bytes, list[tuple[int, int, int]]]:
    """Per layout: the payload's head (magic, count, lengths) and its body as segments in part order.

    A segment is ``(SMALL, a, b)`` (a run of consecutive small parts: ``small[a:b]``), ``(HEADER, 0, 0)``
    or ``(LARGE, k, 0)``: a 2000-channel message is three segments, not 4002 parts.
    """
    head = PAYLOAD_MAGIC + _COUNT.pack(layout.n_parts) + layout.lengths.astype("<u8").tobytes()
    segments: list[list[int]] = []
    for kind, a, b in layout.where:
        if kind == SMALL and segments and segments[-1][0] == SMALL and segments[-1][2] == a:
            segments[-1][2] = b
        else:
            segments.append([kind, a, b])
    return head, [tuple(segment) for segment in segments]


_ENCODE_PLANS: dict[bytes, tuple[bytes, list]] = {}


def encode_payload(parts: Sequence[Any]) -> bytes:
    """The message's parts, byte-identical, in one payload: magic, part count, lengths (u64 LE), parts.

    ``parts``: a ``bsread.parts.PackedParts`` (what the ring sends: joined by
    runs, a few slices per message whatever its part count) or any list of
    buffers.
    """
    if isinstance(parts, PackedParts):
        layout = parts.layout
        plan = _ENCODE_PLANS.get(layout.key)
        if plan is None:
            if len(_ENCODE_PLANS) >= 32:
                _ENCODE_PLANS.clear()
            plan = _ENCODE_PLANS[layout.key] = _segments(layout)
        head, segments = plan
        small, body = memoryview(parts.small), [head]
        for kind, a, b in segments:
            body.append(small[a:b] if kind == SMALL else parts.header if kind == HEADER else parts.large[a])
        return b"".join(body)
    frames = list(parts)
    lengths = struct.pack(f"<{len(frames)}Q", *(memoryview(frame).nbytes for frame in frames))
    return b"".join([PAYLOAD_MAGIC, _COUNT.pack(len(frames)), lengths, *frames])


class PayloadDecoder:
    """Stored payloads -> ``PackedParts``, with what depends only on the part lengths worked out once.

    A stream repeats a few part layouts; a 2000-channel message has 4002
    parts, and a Python step per part (what :func:`decode_payload` would
    otherwise do per message) made a range from the archive drain at a fifth
    of the ring's rate (docs/performance.md, "Archive"). Per distinct layout
    this keeps the ``bsread.parts.Layout`` and the payload-relative runs of
    small parts, the data header's and the large parts' spans; per message
    it is a few slices. Large parts are zero-copy views into the payload
    (immutable bytes); a data header equal to the previous message's is
    shared, as the ring shares it. Every length is checked before anything
    is sliced (InvalidArchive).
    """

    def __init__(self, max_layouts: int = 32) -> None:
        self._layouts = LayoutCache(max_layouts)
        self._plans: dict[bytes, tuple[Any, ...]] = {}
        self._header: bytes | None = None

    def _plan(self, key: bytes) -> tuple[Any, ...]:
        plan = self._plans.get(key)
        if plan is None:
            layout = self._layouts.get(key)
            small_runs: list[list[int]] = []
            header_span = None
            large_spans = []
            offset = 0
            for (kind, _, _), length in zip(layout.where, layout.lengths.tolist()):
                if kind == SMALL:
                    if small_runs and small_runs[-1][1] == offset:
                        small_runs[-1][1] = offset + length
                    else:
                        small_runs.append([offset, offset + length])
                elif kind == HEADER:
                    header_span = (offset, offset + length)
                else:
                    large_spans.append((offset, offset + length))
                offset += length
            plan = (layout, [tuple(run) for run in small_runs], header_span, large_spans, offset)
            if len(self._plans) >= 32:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def decode(self, payload: bytes) -> PackedParts:
        data = payload if isinstance(payload, bytes) else bytes(payload)
        head = len(PAYLOAD_MAGIC) + _COUNT.size
        if len(data) < head or not data.startswith(PAYLOAD_MAGIC):
            raise InvalidArchive("not a stored bsread message (no SFBS1 header)")
        (count,) = _COUNT.unpack_from(data, len(PAYLOAD_MAGIC))
        if not 0 < count <= MAX_PARTS or len(data) < head + 8 * count:
            raise InvalidArchive(f"stored message with a bad part count {count}")
        lengths = np.frombuffer(data, dtype="<u8", count=count, offset=head)
        if int(lengths.max()) >= 2**62:
            raise InvalidArchive("stored message with an impossible part length")
        start = head + 8 * count
        key = lengths.astype(LENGTH_DTYPE).tobytes()
        layout, small_runs, header_span, large_spans, total = self._plan(key)
        if start + total != len(data):
            raise InvalidArchive(f"stored message: parts of {total} bytes in {len(data) - start}")
        view = memoryview(data)
        small = b"".join([view[start + a:start + b] for a, b in small_runs]) if len(small_runs) != 1 \
            else data[start + small_runs[0][0]:start + small_runs[0][1]]
        header = None
        if header_span is not None:
            header = data[start + header_span[0]:start + header_span[1]]
            if header == self._header:
                header = self._header
            self._header = header
        large = tuple(view[start + a:start + b] for a, b in large_spans)
        return PackedParts(layout, small, header, large)


def decode_payload(payload: bytes) -> PackedParts:
    """A stored payload -> the message's parts (``PackedParts``: what the ring would send); InvalidArchive.

    One message; a reader of many keeps a :class:`PayloadDecoder`.
    """
    return PayloadDecoder().decode(payload)


def message_id(pulse_id: int, time: float) -> str:
    """``Nats-Msg-Id``: the same message archived twice (a catch-up after a restart) is stored once.

    Pulse id *and* time: after a source restart the pulse ids repeat, and
    those messages must not be taken for duplicates.
    """
    return f"{pulse_id}@{time!r}"


def message_headers(pulse_id: int, time: float) -> dict[str, str]:
    return {HEADER_KIND: "msg", HEADER_PULSE_ID: str(pulse_id), HEADER_TIME: repr(float(time)),
            HEADER_MSG_ID: message_id(pulse_id, time)}


def gap_headers(first_pulse_id: int, last_pulse_id: int, count: int | None, reason: str, time: float) -> dict[str, str]:
    """A gap marker: pulses first..last that the archive will never have, and why."""
    headers = {HEADER_KIND: "gap", HEADER_PULSE_ID: str(first_pulse_id), HEADER_TIME: repr(float(time)),
               HEADER_GAP_LAST: str(last_pulse_id), HEADER_GAP_REASON: reason,
               HEADER_MSG_ID: f"gap{first_pulse_id}-{last_pulse_id}@{time!r}"}
    if count is not None:
        headers[HEADER_GAP_COUNT] = str(count)
    return headers


@dataclass(frozen=True)
class ArchivedRecord:
    """What the headers of one stored message say: a message or a gap marker, its pulse id(s) and time."""

    kind: str  # "msg" | "gap"
    pulse_id: int
    time: float
    gap_last_pulse_id: int | None = None
    gap_count: int | None = None
    gap_reason: str | None = None


def _int(headers: Mapping[str, str], name: str) -> int:
    value = int(headers[name])
    if not 0 <= value < 2**63:
        raise ValueError(f"{name} out of range")
    return value


def parse_headers(headers: Mapping[str, str] | None) -> ArchivedRecord:
    """NATS headers -> :class:`ArchivedRecord`; InvalidArchive for anything not written by an archiver."""
    if not headers:
        raise InvalidArchive("stored message without headers")
    try:
        kind = headers.get(HEADER_KIND, "msg")
        pulse_id = _int(headers, HEADER_PULSE_ID)
        time = float(headers[HEADER_TIME])
        if not math.isfinite(time):
            raise ValueError("time not finite")
        if kind == "msg":
            return ArchivedRecord("msg", pulse_id, time)
        if kind == "gap":
            count = _int(headers, HEADER_GAP_COUNT) if HEADER_GAP_COUNT in headers else None
            return ArchivedRecord("gap", pulse_id, time, _int(headers, HEADER_GAP_LAST), count,
                                  str(headers.get(HEADER_GAP_REASON, GAP_NOT_ARCHIVED))[:64])
        raise ValueError(f"unknown kind {kind[:20]!r}")
    except (KeyError, ValueError, TypeError) as error:
        raise InvalidArchive(f"stored message with bad headers: {error}") from None


# ---------------------------------------------------------------------------
# The stream's settings
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamSettings:
    """What makes a stream this buffer's archive (compared with an existing stream of the same name).

    ``max_bytes``/``max_age`` (<= 0: unlimited) are limits an operator may
    change on a running archive: the publisher updates them. The others
    define what the archive is: a stream that differs there is refused.
    """

    subjects: tuple[str, ...]
    replicas: int = 1
    max_bytes: int = -1
    max_age: float = 0.0
    storage: str = "file"
    retention: str = "limits"
    discard: str = "old"


def settings_conflicts(existing: StreamSettings, wanted: StreamSettings) -> list[str]:
    """Why ``existing`` cannot serve as the archive ``wanted`` describes (empty: it can; limits may differ)."""
    problems = []
    for field in ("subjects", "replicas", "storage", "retention", "discard"):
        have, want = getattr(existing, field), getattr(wanted, field)
        if (sorted(have) != sorted(want)) if field == "subjects" else have != want:
            problems.append(f"{field} {have!r} (this buffer needs {want!r})")
    return problems


# ---------------------------------------------------------------------------
# Losses and steps
# ---------------------------------------------------------------------------
class PulseStep:
    """The stream's pulse-id step: the smallest positive difference seen (a 10 Hz stream advances by 10).

    The same rule as ``writer.pulse_range.PulseRange`` (docs/architecture.md,
    "two pulse-step estimators"): a gap of pulse ids is then counted in
    pulses the source really sent.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self._last: int | None = None

    def add(self, pulse_id: int) -> None:
        last = self._last
        if last is not None and pulse_id > last:
            step = pulse_id - last
            if self.step is None or step < self.step:
                self.step = step
        self._last = pulse_id


def marker_range(first_pulse_id: int | None, last_pulse_id: int | None,
                 last_seen: int | None) -> tuple[int | None, int | None]:
    """The pulse ids a gap marker covers: from after the newest pulse already seen (a message or a marker).

    A ring that keeps evicting under a reader it cannot send to repeats the
    notice's first pulse id (the last one sent + 1) in every notice; the
    markers must not overlap, or a reader would get the same pulses twice.
    """
    if first_pulse_id is not None and last_seen is not None and first_pulse_id <= last_seen:
        first_pulse_id = last_seen + 1
    return first_pulse_id, last_pulse_id


def lost_pulses(first_pulse_id: int, last_pulse_id: int, step: int | None) -> int:
    """Pulses a source sent between two pulse ids inclusive, at ``step`` (unknown: 1)."""
    if last_pulse_id < first_pulse_id:
        return 0
    return (last_pulse_id - first_pulse_id) // (step or 1) + 1


# ---------------------------------------------------------------------------
# A reader's range
# ---------------------------------------------------------------------------
class RangeCursor:
    """A range over stored records, in stream order -> the replay protocol's events (pure).

    Feed :meth:`record` every stored record from the first one at or after
    the start (the reader found it by binary search) in stream order; it
    returns what the writer gets: ``[Gap]``, ``[Data]``, ``[End]`` or
    nothing (before the start). ``first_stored`` is the archive's oldest
    record when the range was opened: a start before it is a
    ``before_archive`` gap (pulse ids known) -- the analogue of the ring's
    ``before_buffer``.
    """

    def __init__(self, start_pulse_id: int | None = None, start_time: float | None = None,
                 stop_pulse_id: int | None = None, stop_time: float | None = None,
                 first_stored: ArchivedRecord | None = None) -> None:
        if start_pulse_id is None and start_time is None:
            raise ValueError("a range starts at a pulse id or a time")
        self.start_pulse_id = start_pulse_id
        self.start_time = start_time
        self.stop_pulse_id = stop_pulse_id
        self.stop_time = stop_time
        self.ended: End | None = None
        self.last_pulse_id: int | None = None
        self._started = False
        self._opening: list[Any] = []
        if first_stored is not None:
            if start_pulse_id is not None and start_pulse_id < first_stored.pulse_id:
                last = first_stored.pulse_id - 1
                if stop_pulse_id is not None:
                    last = min(last, stop_pulse_id)
                self._opening.append(Gap(start_pulse_id, last, GAP_BEFORE_ARCHIVE, None))
            elif start_pulse_id is None and start_time is not None and start_time < first_stored.time:
                self._opening.append(Gap(None, first_stored.pulse_id - 1, GAP_BEFORE_ARCHIVE, None))

    @property
    def started(self) -> bool:
        """A record at or after the start has been seen."""
        return self._started

    def set_stop(self, stop_pulse_id: int | None, stop_time: float | None) -> list[Any]:
        """A moved stop: an End at once if what was delivered already reaches it."""
        self.stop_pulse_id, self.stop_time = stop_pulse_id, stop_time
        if self.ended is None and stop_pulse_id is not None and self.last_pulse_id is not None \
                and self.last_pulse_id >= stop_pulse_id:
            return [self._end(EndReason.STOP_PULSE_ID)]
        return []

    def opening(self) -> list[Any]:
        """The events owed before any record (a start before the archive's oldest)."""
        out, self._opening = self._opening, []
        if out and self.stop_pulse_id is not None and out[0].last_pulse_id is not None \
                and out[0].last_pulse_id >= self.stop_pulse_id:
            out.append(self._end(EndReason.STOP_PULSE_ID))
        return out

    def _end(self, reason: EndReason) -> End:
        self.ended = End(reason.value, self.last_pulse_id)
        return self.ended

    def _past_stop(self, record: ArchivedRecord) -> End | None:
        if self.stop_pulse_id is not None and record.pulse_id > self.stop_pulse_id:
            return self._end(EndReason.STOP_PULSE_ID)
        if self.stop_time is not None and record.time > self.stop_time:
            return self._end(EndReason.STOP_TIME)
        return None

    def record(self, record: ArchivedRecord, parts: Any = None) -> list[Any]:
        """One stored record (``parts`` its decoded payload, for a message) -> events."""
        if self.ended is not None:
            return []
        if not self._started:
            before = ((self.start_pulse_id is not None and
                       (record.gap_last_pulse_id if record.kind == "gap" else record.pulse_id) < self.start_pulse_id)
                      or (self.start_pulse_id is None and record.time < (self.start_time or 0.0)))
            if before:
                return []
            self._started = True
        end = self._past_stop(record)
        if end is not None:
            return [end]
        if record.kind == "gap":
            first = max(record.pulse_id, self.start_pulse_id or 0)
            last = record.gap_last_pulse_id
            if self.stop_pulse_id is not None:
                last = min(last, self.stop_pulse_id)
            return [Gap(first, last, record.gap_reason or GAP_NOT_ARCHIVED,
                        record.gap_count if first == record.pulse_id else None)]
        self.last_pulse_id = record.pulse_id
        out: list[Any] = [Data(record.pulse_id, parts, record.time)]
        if self.stop_pulse_id is not None and record.pulse_id == self.stop_pulse_id:
            out.append(self._end(EndReason.STOP_PULSE_ID))  # inclusive: no need to wait for the next one
        return out


# ---------------------------------------------------------------------------
# A writer's reach into the archive
# ---------------------------------------------------------------------------
RING, ARCHIVE = "ring", "archive"

#: The ring's gap reasons that the archive may fill: older than the ring, or evicted under a slow reader.
REACHABLE_REASONS = frozenset({GapReason.BEFORE_BUFFER.value, GapReason.EVICTED.value})


def should_reach_back(gap: Gap, archive_known: bool, switches: int, delivered_since_switch: bool,
                      max_switches: int = 8) -> bool:
    """Whether a gap the ring reports is read from the archive instead of being passed on (pure).

    Only losses the archive can fill (the ring's ``before_buffer`` and
    ``evicted``), only with an archive, and only if the last trip to the
    archive brought something (else the archive lags the ring and does not
    have them either: the gap goes to the writer as the ring said it), at
    most ``max_switches`` times per range.
    """
    if not archive_known or gap.reason not in REACHABLE_REASONS or switches >= max_switches:
        return False
    return switches == 0 or delivered_since_switch


class OriginLog:
    """Which pulses came from where, as runs: ``[{"origin", "first_pulse_id", "last_pulse_id", "count"}]``.

    What the file's ``pulse_sources`` attribute says (docs/file-format.md).
    """

    def __init__(self) -> None:
        self._runs: list[list[Any]] = []

    def add(self, origin: str, pulse_id: int) -> None:
        runs = self._runs
        if runs and runs[-1][0] == origin and pulse_id > runs[-1][2]:
            runs[-1][2] = pulse_id
            runs[-1][3] += 1
        else:
            runs.append([origin, pulse_id, pulse_id, 1])

    @property
    def used(self) -> set[str]:
        return {run[0] for run in self._runs}

    def runs(self) -> list[dict[str, Any]]:
        return [{"origin": origin, "first_pulse_id": first, "last_pulse_id": last, "count": count}
                for origin, first, last, count in self._runs]
