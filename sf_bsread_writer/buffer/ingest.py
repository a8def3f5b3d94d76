"""What happens to one received message, without a socket: validate, time, analyse, store, count.

Why apart from the loop (``buffer.service``): this is where a pulse is kept
or dropped and why, and it is all decisions (the parser's, the time base's,
the ring's), fed the message, the loop's ``now`` and the receive time. The
loop owns the sockets and calls :meth:`Ingest.receive` per message; when it
says so, the loop forwards the message to the live output and the feeds.
No clock is read here (``now`` and ``received_at`` come in; the rate
limited log is given the loop's clock), so tests drive it with frames.

Guarantees: a message that is not valid bsread costs that message only
(counted by reason in ``rejected``, logged rate limited); a parser bug
likewise (``parser_error``); a bad source clock costs the time, never the
pulse (kept, timed by the receive time, counted).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sf_bsread_writer.bsread.message import Message, MessageParser
from sf_bsread_writer.bsread.parts import PackedParts
from sf_bsread_writer.bsread.spec import (
    DECODING_REASONS,
    IgnoredMessage,
    ProtocolError,
    RejectReason,
)
from sf_bsread_writer.bsread.timebase import TimeBase, message_time
from sf_bsread_writer.ring import AppendStatus, Ring
from sf_bsread_writer.status import SOURCE_IDLE_SECONDS

__all__ = ["Ingest", "RateLimitedLog", "ANALYZER_MAX_LINES", "REJECT_LOG_INTERVAL", "REJECT_REASONS"]

#: The buffer's own reject reasons beside the parser's: a message larger than the whole ring
#: (``--buffer-bytes``), and a parser that failed (a bug: the message is dropped, the service goes on).
LARGER_THAN_RING = "larger_than_ring"
PARSER_ERROR = "parser_error"
#: Every key ``/statistics`` ``rejected`` can have (docs/buffer.md; tests/test_docs_hold.py).
REJECT_REASONS = tuple(reason.value for reason in RejectReason if reason not in DECODING_REASONS) + (
    LARGER_THAN_RING, PARSER_ERROR)

logger = logging.getLogger(__name__)

REJECT_LOG_INTERVAL = 5.0
# --analyzer: at most this many "data missing" lines per message (then one line with the count).
ANALYZER_MAX_LINES = 100
# Refused channels named in the one log line of a new data header (the statistics count them all).
REFUSED_SHOWN = 5


class RateLimitedLog:
    """Log a repeated event at most once per interval and key, saying how many were suppressed.

    ``clock`` is the loop's (a source that sends garbage at 1 kHz must not write 1000 lines a second).
    """

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


class Ingest:
    """The buffer's side of its source: one message in, the ring and the counters updated.

    The counters are read by the snapshot (``buffer.snapshot``) in the same
    thread; nothing here is thread-safe (one owner: the loop).
    """

    def __init__(self, stream: str, ring: Ring, log: RateLimitedLog, *, max_message_bytes: int,
                 max_clock_skew: float, analyzer: bool = False) -> None:
        self.stream = stream
        self.ring = ring
        self.analyzer = analyzer
        self.max_clock_skew = max_clock_skew
        self._log = log
        self._parser = MessageParser(max_message_bytes)
        self.received = 0
        self.received_bytes = 0
        self.rejected: dict[str, int] = {}
        self.ignored = 0
        self.duplicates = 0
        self.header_changes = 0
        self._last_header: Any = None  # compared with DataHeader.same_as
        self.channels: int | None = None  # of the newest data header
        self.last_pulse_id: int | None = None
        self.last_message_monotonic: float | None = None
        self._previous_message_monotonic: float | None = None
        self._idle_reported = False  # "source idle" logged, "source back" not yet
        self.last_message_time: float | None = None
        self.timed_by_receive = 0
        self.invalid_timestamps = 0  # global timestamps that were no time: kept, timed by receive
        self.refused_channel_values: dict[str, int] = {}  # by reason: ChannelSpec.refused, message kept
        self._time_base: TimeBase | None = None  # of the last message: a change is logged
        self.clock_offset: float | None = None

    def reject(self, reason: str) -> None:
        """Count one message dropped for ``reason`` (also for the loop's own reasons)."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def receive(self, frames: PackedParts, now: float, received_at: float) -> bool:
        """One message as received (``now``: the loop's clock; ``received_at``: the wall clock).

        Returns True when the message goes on to the live output and the feeds
        (stored, or held back by the ring: the live output is a relay).
        """
        self._previous_message_monotonic = self.last_message_monotonic
        self.last_message_monotonic = now
        try:
            message = self._parser.parse(frames)
        except IgnoredMessage as ignored:
            self.ignored += 1
            if self.analyzer:
                logger.info("analyzer: control message %s ignored", getattr(ignored, "htype", ignored))
            return False
        except ProtocolError as error:
            reason = getattr(error.reason, "value", str(error.reason))
            self.reject(reason)
            self._log.warning(reason, "rejected message (%s): %s", reason, error.detail)
            return False
        except Exception as error:  # a parser bug must cost one message, not the service
            reason = PARSER_ERROR
            self.reject(reason)
            self._log.warning(reason, "message dropped, the parser failed: %r", error)
            return False
        pulse_id = message.pulse_id
        timestamp, base = message_time(message.timestamp, received_at, self.max_clock_skew)
        if message.main.timestamp_invalid:
            # A bad clock costs the time, never the pulse: the values are kept, the receive time stands in.
            self.invalid_timestamps += 1
            self._log.warning("bad_clock", "pulse_id %d: %s; kept, timed by the buffer's receive time",
                              pulse_id, message.main.timestamp_invalid)
        self._note_time_base(base, message.timestamp, received_at, pulse_id)
        self._analyze(message, pulse_id)
        ring = self.ring
        result = ring.append(pulse_id, timestamp, frames)
        for event in result.events:  # the ring decides, the buffer tells (rate limited per kind)
            self._log.warning(event.kind, "%s", event.text)
        if result.status is AppendStatus.HELD_BACK:
            # The ring waits for the next messages to tell a source restart or a real jump from a
            # stray message (ring.py); the live output is a relay and passes it on now.
            where = "below" if pulse_id < (ring.newest_pulse_id or 0) else "far above"
            self._log.info("held", "pulse id %d is %s the newest held (%s): held back from the ring until "
                           "the next messages confirm it", pulse_id, where, ring.newest_pulse_id)
        elif result.status is not AppendStatus.STORED:
            if result.status is AppendStatus.DUPLICATE:
                self.duplicates += 1
                self._log.warning("duplicate", "message with repeated pulse id %d dropped", pulse_id)
            else:  # larger than the whole ring (--buffer-bytes)
                self.reject(LARGER_THAN_RING)
            return False
        if result.skipped_pulses:
            self._log.info("jump", "pulse id jumped to %d: %d pulses skipped (usual step %s)",
                           pulse_id, result.skipped_pulses, ring.usual_step)
        if self.received == 0:
            logger.info("first message from %s: pulse_id %d, %d channels", self.stream, pulse_id,
                        message.n_channels)
        if self._idle_reported:
            self._idle_reported = False
            logger.info("source back after %.1f s of silence, at pulse_id %d",
                        self.last_message_monotonic - self._previous_message_monotonic, pulse_id)
        self.received += 1
        self.received_bytes += message.nbytes
        self.last_message_time = timestamp
        return True

    def check_idle(self, now: float) -> None:
        """A silent source is logged once (and once when it is back, in :meth:`receive`)."""
        last = self.last_message_monotonic
        if last is not None and not self._idle_reported and now - last > SOURCE_IDLE_SECONDS:
            self._idle_reported = True
            logger.warning("source %s idle: no message for %.0f s (last pulse_id %s)", self.stream, now - last,
                           self.last_pulse_id)

    def _note_time_base(self, base: TimeBase, source_timestamp: float, received_at: float, pulse_id: int) -> None:
        """Count the messages timed by their receive time; log when a source's clock becomes (im)plausible."""
        self.clock_offset = source_timestamp - received_at if source_timestamp > 0 else None
        if base is TimeBase.RECEIVE:
            self.timed_by_receive += 1
        if base is not self._time_base:
            # Rate limited: a source whose clock hovers at the limit would otherwise log every message.
            if base is TimeBase.RECEIVE:
                self._log.warning(
                    "clock", "pulse_id %d: the source's global timestamp %.6f is %s; time windows use the "
                    "buffer's receive time for its messages (--max-clock-skew %g s)", pulse_id, source_timestamp,
                    "absent" if source_timestamp <= 0 else f"{source_timestamp - received_at:+.3f} s off the receive "
                    "time", self.max_clock_skew)
            elif self._time_base is not None:
                self._log.info("clock_back", "pulse_id %d: the source's global timestamp is plausible again",
                               pulse_id)
            self._time_base = base

    def _analyze(self, message: Message, pulse_id: int) -> None:
        """Count and log header changes; jumps and resets are counted by the ring. --analyzer: absent values."""
        header = message.data_header
        if not header.same_as(self._last_header):
            if self._last_header is not None:
                self.header_changes += 1
                self._log.info("header", "data header changed at pulse %d: %d channels (hash %s -> %s)",
                               pulse_id, message.n_channels, self._last_header.hash, header.hash)
            self._last_header = header
            self.channels = message.n_channels
            if header.refused:
                shown = [f"{header.channels[index].name!r} ({header.channels[index].refused_detail})"
                         for index in header.refused[:REFUSED_SHOWN]]
                more = len(header.refused) - len(shown)
                self._log.warning("refused_channels", "data header at pulse %d: %d channel(s) refused: %s%s; "
                                  "the messages and their other channels are kept", pulse_id,
                                  len(header.refused), "; ".join(shown), f" and {more} more" if more else "")
        if header.refused:
            counts = self.refused_channel_values
            for index in header.refused:
                reason = header.channels[index].refused.value
                counts[reason] = counts.get(reason, 0) + 1
        if self.last_pulse_id is not None and pulse_id < self.last_pulse_id and self.analyzer:
            logger.info("analyzer: pulse id went back from %d to %d", self.last_pulse_id, pulse_id)
        self.last_pulse_id = pulse_id
        if self.analyzer:
            log_absent_channels(message, pulse_id)


def log_absent_channels(message: Message, pulse_id: int) -> None:
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
