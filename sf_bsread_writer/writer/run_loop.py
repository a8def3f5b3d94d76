"""The body of the writer's run thread: receive, classify, write, until the range is over.

The run thread is the only owner of the source and the output file. The
decisions it makes are pure and live in the core (``PulseRange`` decides
what belongs in the file and what is missing, ``SilenceWatch`` when a quiet
source ends the run); this loop moves messages between the source and the
file (which writes /missing from the range's own list: ``missing_from``),
applies the commands the REST threads post on its queue, and keeps the
counters that ``/statistics`` shows. ``clock`` is injected, so the
stop-deadline behaviour is tested with a fake clock and a scripted source.
"""
from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sf_bsread_writer.bsread.message import MessageParser
from sf_bsread_writer.bsread.spec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    IgnoredMessage,
    ProtocolError,
)
from sf_bsread_writer.bsread.timebase import (
    MAX_CLOCK_SKEW,
    TimeBase,
    file_time_base,
    message_time,
)
from sf_bsread_writer.h5.file import DiskFull
from sf_bsread_writer.rates import RateEstimator
from sf_bsread_writer.replay.messages import (
    BufferLost,
    Data,
    End,
    Gap,
    GapReason,
    MissingRange,
    Refused,
)
from sf_bsread_writer.writer.acquisition import EndRun, MoveStop, RunEnd, SilenceWatch
from sf_bsread_writer.writer.pulse_range import PulseRange, Verdict

__all__ = ["RunCounters", "RunLoop", "POLL_INTERVAL", "DISK_FULL"]

logger = logging.getLogger(__name__)

# How long one receive waits: the latency of commands (stop, kill) and of the
# silence check. Short enough to feel immediate, long enough not to spin.
POLL_INTERVAL = 0.1
# The write rate shown while writing: over about the last second (shown once half a second is known).
RATE_WINDOW_SECONDS = 1.0
# A long run says how it is going this often (INFO).
PROGRESS_LOG_SECONDS = 10.0
# The end reason of a run that the disk ended, and the reason of the pulses it cost (/missing).
DISK_FULL = RunEnd.DISK_FULL.value


@dataclass
class RunCounters:
    """Written by the run thread only; ``/statistics`` reads them without a lock (plain values)."""

    messages_received: int = 0
    messages_written: int = 0
    messages_before_start: int = 0
    messages_out_of_order: int = 0
    messages_rejected: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    gap_notices: int = 0
    buffer_lost: int = 0
    source_reconnects: int = 0  # the source's count (transport.connection): a part over its bound refused
    rate: float = 0.0
    time_base: str | None = None  # of the rows written: bsread.timebase (also the file attribute)
    # Losses whose pulse ids are unknown (a range by time before the buffer's
    # oldest, a source reset): in the statistics and the file attributes, not in /missing.
    unlocated_gaps: list[Gap] = field(default_factory=list)


class RunLoop:
    """Receive, filter, write, until the range is over; :meth:`run` returns why it ended.

    ``source``: ``start``ed, with ``receive(timeout)``, ``set_stop`` (a
    ReplayClient or DirectSource); ``output``: an H5File or NullOutput;
    ``commands``: MoveStop / EndRun from the REST threads; ``on_finishing``
    tells the control (under its lock) that the run is ending and why.

    A message's time (what a range by time compares) is the one the buffer
    sends with it (``Data.time``: ``bsread.timebase``). ``receive_clock`` is
    for a source that sends none (``--direct``): the wall clock that stands
    in for a source timestamp off by more than ``max_clock_skew``.
    """

    def __init__(self, source: Any, output: Any, pulse_range: PulseRange, counters: RunCounters,
                 commands: "queue.SimpleQueue[MoveStop | EndRun]", stop_deadline: float,
                 on_finishing: Callable[[str], None], clock: Callable[[], float],
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 receive_clock: Callable[[], float] | None = None, max_clock_skew: float = MAX_CLOCK_SKEW) -> None:
        self.source = source
        self.output = output
        self.range = pulse_range
        self.counters = counters
        self.commands = commands
        self.on_finishing = on_finishing
        self.clock = clock
        self.parser = MessageParser(max_message_bytes)
        now = clock()
        self.silence = SilenceWatch(stop_deadline, now)
        self.started_at = now
        self._rate = RateEstimator(RATE_WINDOW_SECONDS, resolution=RATE_WINDOW_SECONDS / 10)
        self._rate.add(now, 0)
        self._next_progress_log = now + PROGRESS_LOG_SECONDS
        self._header: Any = None  # the data header of the last message (for the log of changes)
        self.receive_clock = receive_clock
        self.max_clock_skew = max_clock_skew
        self._row_timed_by_receive = bytearray()  # per written row: 1 if its time is the receive time
        # A file busy with thousands of channels keeps the source's session alive meanwhile (heartbeats).
        keep_alive = getattr(source, "keep_alive", None)
        if keep_alive is not None and hasattr(output, "keep_alive"):
            output.keep_alive = keep_alive
        # One list of missing pulses, the range's: the file writes it as it is at each flush and at the close.
        output.missing_from(lambda: pulse_range.missing)

    def run(self) -> str:
        """Until the range is over; returns why it ended, the head and tail that never arrived recorded.

        A full disk (:class:`DiskFull` from the file) ends the run at once:
        the rows that did not reach the file and the rest of the range are
        recorded as missing (``disk_full``).
        """
        try:
            reason = self._receive()
            # The last rows now, not in the close: a full disk still cuts them from the range.
            self.output.flush()
        except DiskFull as full:
            reason = self._disk_full(full)
        return self.finish(reason)

    def _receive(self) -> str:
        while True:
            if self.range.complete:
                return RunEnd.STOP_REACHED.value
            event = self.source.receive(POLL_INTERVAL)
            self.counters.source_reconnects = getattr(self.source, "reconnects", 0)
            # Commands after the receive, before the event: a stop posted while waiting
            # applies to the message that ended the wait.
            reason = self._apply_commands()
            if reason is not None:
                return reason
            now = self.clock()
            # append() flushes on its own; this covers a quiet source and events that write
            # no row (gaps, messages before the start or out of order), so no row waits in
            # memory longer than flush_interval (what kill -9 can cost).
            self.output.maybe_flush()
            if event is None:
                reason = self.silence.end_reason(now, self.range.has_stop)
                if reason is not None:
                    return reason
            elif isinstance(event, Data):
                self.silence.data(now)
                self._data(event.frames, event.time)
            elif isinstance(event, Gap):
                self._gap(event)
            elif isinstance(event, End):
                logger.info("The buffer ended the replay: %s (last pulse_id %s)", event.reason, event.last_pulse_id)
                self.range.end_reached()
                return RunEnd.STOP_REACHED.value
            elif isinstance(event, BufferLost):
                # The client re-requests the rest of the range by itself; a buffer that stays
                # away is a silent source for the stop deadline.
                self.counters.buffer_lost += 1
                self.silence.buffer_lost()
            elif isinstance(event, Refused):
                raise RuntimeError(f"the buffer refused the replay request: {event.reason}: {event.detail}")
            else:
                logger.warning("Ignoring an unknown event from the source: %r", event)
            self._update_rate(now)

    def finish(self, reason: str) -> str:
        """The range is over: record the head and tail that never arrived."""
        self.on_finishing(reason)
        for item in self.range.close(reason):
            self._log_missing(item)
        return reason

    def _disk_full(self, full: DiskFull) -> str:
        """The file holds ``full.rows_kept`` rows and takes no more: the rest of the range is missing."""
        kept = full.rows_kept
        logger.error("Disk full: %s. The run ends: %d rows are in the file; the rest of the range is recorded "
                     "as missing (%s)", full, kept, DISK_FULL)
        for item in self.range.cut(kept, DISK_FULL):
            self._log_missing(item)
        self.counters.messages_written = kept
        del self._row_timed_by_receive[kept:]
        self._update_time_base()
        return DISK_FULL

    def average_rate(self) -> float | None:
        """Messages written per second since the run started (the rate shown once finished)."""
        elapsed = self.clock() - self.started_at
        return self.counters.messages_written / elapsed if elapsed > 0 else None

    def _update_rate(self, now: float) -> None:
        """Every loop turn, data or not: the rate falls to 0 within a second when nothing is written.

        The rate is read again only when the estimator kept the sample (once
        per tenth of the window): in between it cannot have changed.
        """
        if self._rate.add(now, self.counters.messages_written):
            rate = self._rate.rate()
            if rate is not None and self._rate.span >= RATE_WINDOW_SECONDS / 2:
                self.counters.rate = rate
        if now >= self._next_progress_log:
            self._next_progress_log = now + PROGRESS_LOG_SECONDS
            progress = self.range.progress()
            logger.info("%d rows written, last pulse_id %s, %.1f msg/s, %d pulses missing%s",
                        self.counters.messages_written, self.range.last_pulse_id, self.counters.rate,
                        self.range.missing_count, "" if progress is None else f", {100 * progress:.0f} % done")

    def _apply_commands(self) -> str | None:
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return None
            if isinstance(command, EndRun):
                return command.reason
            if isinstance(command, MoveStop):
                keep = self.range.set_stop(command.stop_pulse_id, command.stop_time)
                if keep is not None:  # rows past the new stop were written already: remove them
                    removed = self.output.truncate(keep)  # /missing follows the range's clipped list
                    logger.info("The stop came after its pulse was written: %d rows removed", removed)
                    self.counters.messages_written = keep
                    del self._row_timed_by_receive[keep:]
                    self._update_time_base()
                self.source.set_stop(stop_pulse_id=command.stop_pulse_id, stop_time=command.stop_time)
                self.silence.stop_moved(self.clock(), command.now)

    @property
    def time_base(self) -> str | None:
        """``source``, ``receive`` or ``mixed`` for the rows written; None without rows."""
        return self.counters.time_base

    def _update_time_base(self) -> None:
        by_receive = self._row_timed_by_receive.count(1)
        base = file_time_base(len(self._row_timed_by_receive) - by_receive, by_receive)
        self.counters.time_base = base.value if base is not None else None

    def _message_time(self, message: Any, sent_time: float | None) -> float:
        if sent_time is not None:
            return sent_time
        if self.receive_clock is not None:
            return message_time(message.timestamp, self.receive_clock(), self.max_clock_skew)[0]
        return message.timestamp

    def _data(self, frames: Sequence[Any], sent_time: float | None = None) -> None:
        counters = self.counters
        counters.messages_received += 1
        try:
            message = self.parser.parse(frames)
        except IgnoredMessage:
            return
        except ProtocolError as error:
            counters.messages_rejected += 1
            key = error.reason.value
            counters.rejected_reasons[key] = counters.rejected_reasons.get(key, 0) + 1
            logger.warning("Rejected a message: %s", error)
            return
        if not message.data_header.same_as(self._header):
            if self._header is not None:
                logger.info("data header changed at pulse_id %d: %d channels", message.pulse_id, message.n_channels)
            self._header = message.data_header
        time = self._message_time(message, sent_time)
        verdict = self.range.classify(message.pulse_id, time)
        if verdict is Verdict.WRITE:
            self.output.append(message, time)
            counters.messages_written += 1
            by_receive = time != message.timestamp  # the buffer replaced an implausible source time
            self._row_timed_by_receive.append(by_receive)
            base = TimeBase.RECEIVE.value if by_receive else TimeBase.SOURCE.value
            if counters.time_base is None:
                counters.time_base = base
            elif counters.time_base != base:
                counters.time_base = TimeBase.MIXED.value
            for item in self.range.written(message.pulse_id, time):
                self._log_missing(item)
        elif verdict is Verdict.BEFORE:
            counters.messages_before_start += 1
        elif verdict is Verdict.OLD:
            counters.messages_out_of_order += 1

    def _gap(self, gap: Gap) -> None:
        self.counters.gap_notices += 1
        if gap.reason == GapReason.SOURCE_RESET.value:
            self.range.source_reset()
        if gap.first_pulse_id is None or gap.last_pulse_id is None:
            # Pulse ids unknown (a range by time before the buffer's oldest, a source reset):
            # kept in the statistics and the file attributes, not in /missing.
            if gap.count != 0:
                logger.warning("Messages lost where pulse ids are unknown: %s", gap)
                self.counters.unlocated_gaps.append(gap)
            return
        for item in self.range.gap(gap.first_pulse_id, gap.last_pulse_id, gap.reason, gap.count):
            self._log_missing(item)

    @staticmethod
    def _log_missing(item: MissingRange) -> None:
        """Newly recorded by the range (which the file reads): said once, in the log."""
        logger.warning("Pulses %d..%d missing (%d): %s", item.first_pulse_id, item.last_pulse_id, item.count,
                       item.reason)
