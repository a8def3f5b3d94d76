"""Which message of a stream belongs in the file, and which pulses of the range are missing and why (pure).

The writer's run loop classifies every message with :meth:`PulseRange.classify`
and accounts for every row written; what never arrived is recorded once, as
:class:`MissingRange` records that go into the file's ``/missing`` table and
the writer's statistics. No I/O and no clock: pulse ids and the source's
timestamps in, verdicts and records out.
"""
from __future__ import annotations

import bisect
import enum
from array import array

from sf_bsread_writer.replay.messages import MissingRange

__all__ = ["MissingReason", "Verdict", "PulseRange"]


class MissingReason(str, enum.Enum):
    """The ``/missing`` reasons this module gives itself; the others are the buffer's gap reasons
    (``replay_messages.GapReason``) and the run's end reasons for a tail (``acquisition.RunEnd``)."""

    NOT_RECEIVED = "not_received"  # the head of the range, before the first message received
    PULSE_ID_JUMP = "pulse_id_jump"  # the stream skipped pulse ids (a step larger than its usual step)



class Verdict(enum.Enum):
    BEFORE = "before"    # before the start: not written
    OLD = "old"          # not after the last written pulse (duplicate, source reset): not written
    WRITE = "write"      # in the range: write it
    AFTER = "after"      # past the stop: the range is complete, not written


class PulseRange:
    """Decide, message by message, what belongs in the file; keep account of what is missing.

    Missing pulses come from three places and are each recorded once:
    gap notices of the buffer (:meth:`gap`), pulse-id jumps larger than the
    stream's usual step (:meth:`written`), and, at the end, the head and tail
    of the range that never arrived (:meth:`close`). The usual step is the
    smallest positive difference seen (a 10 Hz source at SwissFEL advances
    by 10), so a slow source is not reported as losing nine pulses in ten.
    """

    _STEP_LEARNING = 32  # messages during which an early jump can still be reinterpreted

    def __init__(self, start_pulse_id: int | None = None, start_time: float | None = None,
                 stop_pulse_id: int | None = None, stop_time: float | None = None) -> None:
        self.start_pulse_id = start_pulse_id
        self.start_time = start_time
        self.stop_pulse_id = stop_pulse_id
        self.stop_time = stop_time
        self.first_pulse_id: int | None = None
        self.first_timestamp: float | None = None
        self.last_pulse_id: int | None = None
        self.last_timestamp: float | None = None
        self.step: int | None = None
        self.past_stop = False
        # The stop pulse (not a stop time) ended the range: only then is a tail up to it owed.
        self.ended_by_stop_pulse = False
        self.missing: list[MissingRange] = []
        self._covered: list[tuple[int, int]] = []
        self._previous: int | None = None  # last written pulse id in the current numbering
        self._early: list[tuple[int, int]] = []  # (previous, pulse_id) while the step is being learned
        # Pulse id and timestamp of every row written, to cut the file if the stop comes late (16 B/row).
        self._written_ids = array("q")
        self._written_times = array("d")

    @property
    def has_stop(self) -> bool:
        return self.stop_pulse_id is not None or self.stop_time is not None

    @property
    def complete(self) -> bool:
        """The stop is reached: the stop pulse written, or a message past the stop seen."""
        if self.past_stop:
            return True
        return (self.stop_pulse_id is not None and self.last_pulse_id is not None
                and self.last_pulse_id >= self.stop_pulse_id)

    @property
    def missing_count(self) -> int:
        return sum(item.count for item in self.missing)

    def set_stop(self, stop_pulse_id: int | None, stop_time: float | None) -> int | None:
        """Move the stop. If rows past the new stop were already written, forget them and
        return how many rows to keep (the file must be cut there); else None.

        A stop that arrives after its pulse was written is normal for a past
        range: the replay drains the backlog faster than a script sends
        ``start_pulse_id`` and then ``stop_pulse_id``.
        """
        self.stop_pulse_id, self.stop_time = stop_pulse_id, stop_time
        keep = len(self._written_ids)
        if stop_pulse_id is not None and self._written_ids and self._written_ids[-1] > stop_pulse_id:
            keep = min(keep, bisect.bisect_right(self._written_ids, stop_pulse_id))
            self.ended_by_stop_pulse = True
        if stop_time is not None and self._written_times and self._written_times[-1] > stop_time:
            keep = min(keep, bisect.bisect_right(self._written_times, stop_time))
        if keep == len(self._written_ids):
            return None
        self.past_stop = True
        del self._written_ids[keep:], self._written_times[keep:]
        if keep:
            self.last_pulse_id, self.last_timestamp = self._written_ids[-1], self._written_times[-1]
        else:
            self.first_pulse_id = self.first_timestamp = self.last_pulse_id = self.last_timestamp = None
        self._previous = self.last_pulse_id
        # Missing pulses noted beyond the new stop are not part of the range any more.
        limit = stop_pulse_id if stop_pulse_id is not None else self.last_pulse_id
        if limit is None:
            self.missing, self._covered = [], []
        else:
            self.missing = [item if item.last_pulse_id <= limit else
                            MissingRange(item.first_pulse_id, limit,
                                         min(item.count, self._estimate(item.first_pulse_id, limit)), item.reason)
                            for item in self.missing if item.first_pulse_id <= limit]
            self._covered = [(item.first_pulse_id, item.last_pulse_id) for item in self.missing]
        return keep

    def cut(self, keep: int, reason: str) -> list[MissingRange]:
        """Only the first ``keep`` rows written reached the file (a full disk): the rest are missing for ``reason``.

        Returns what is newly recorded: the pulses of the rows dropped (a
        pulse-id jump among them stays recorded as the jump). The tail after
        them is the business of :meth:`close`, as for any run that ended early.
        """
        dropped = len(self._written_ids) - keep
        if dropped <= 0:
            return []
        first, last = self._written_ids[keep], self._written_ids[-1]
        del self._written_ids[keep:], self._written_times[keep:]
        if keep:
            self.last_pulse_id, self.last_timestamp = self._written_ids[-1], self._written_times[-1]
        else:
            self.first_pulse_id = self.first_timestamp = self.last_pulse_id = self.last_timestamp = None
        return self._record(first, last, reason, dropped)

    @property
    def rows(self) -> int:
        """Rows written (and kept)."""
        return len(self._written_ids)

    def progress(self) -> float | None:
        """Fraction of the requested range written so far (by pulse id, else by time); None if unknown."""
        if self.complete:
            return 1.0
        if self.last_pulse_id is None:
            return 0.0 if self.has_stop else None
        if self.stop_pulse_id is not None:
            first = self.start_pulse_id if self.start_pulse_id is not None else self.first_pulse_id
            span = self.stop_pulse_id - first + 1
            return max(0.0, min(1.0, (self.last_pulse_id - first + 1) / span))
        if self.stop_time is not None and self.last_timestamp is not None:
            first_time = self.start_time if self.start_time is not None else self.first_timestamp
            span = self.stop_time - first_time
            if span <= 0:
                return 1.0
            return max(0.0, min(1.0, (self.last_timestamp - first_time) / span))
        return None

    def classify(self, pulse_id: int, timestamp: float) -> Verdict:
        if self.stop_pulse_id is not None and pulse_id > self.stop_pulse_id:
            self.past_stop = self.ended_by_stop_pulse = True
            return Verdict.AFTER
        if self.stop_time is not None and timestamp > self.stop_time:
            self.past_stop = True
            return Verdict.AFTER
        if ((self.start_pulse_id is not None and pulse_id < self.start_pulse_id)
                or (self.start_time is not None and timestamp < self.start_time)):
            return Verdict.BEFORE
        if self._previous is not None and pulse_id <= self._previous:
            return Verdict.OLD
        return Verdict.WRITE

    def written(self, pulse_id: int, timestamp: float) -> list[MissingRange]:
        """Account for one written message; returns the pulse-id jumps it reveals (already recorded)."""
        previous = self._previous
        self._previous = pulse_id
        self.last_pulse_id, self.last_timestamp = pulse_id, timestamp
        self._written_ids.append(pulse_id)
        self._written_times.append(timestamp)
        if self.first_pulse_id is None:
            self.first_pulse_id, self.first_timestamp = pulse_id, timestamp
        if previous is None:
            return []
        difference = pulse_id - previous
        found: list[MissingRange] = []
        if self.step is None or difference < self.step:
            old_step = self.step
            self.step = difference
            if old_step is not None:
                # The step was overestimated: earlier differences may be jumps after all.
                for early_previous, early_pulse_id in self._early:
                    if early_pulse_id - early_previous > self.step:
                        found += self._jump(early_previous, early_pulse_id)
        elif difference > self.step:
            found += self._jump(previous, pulse_id)
        if len(self._written_ids) <= self._STEP_LEARNING:
            self._early.append((previous, pulse_id))
        else:
            self._early.clear()
        return found

    def source_reset(self) -> None:
        """The buffer says the source restarted its pulse ids: accept the new numbering from here."""
        self._previous = None
        self._early.clear()

    def end_reached(self) -> None:
        """The buffer has passed the stop (its End notice): a tail not received is a pulse-id jump."""
        self.past_stop = True

    def gap(self, first_pulse_id: int, last_pulse_id: int, reason: str,
            count: int | None = None) -> list[MissingRange]:
        """A gap notice from the buffer, clipped to the range; returns what is newly recorded."""
        first, last = first_pulse_id, last_pulse_id
        if self.start_pulse_id is not None:
            first = max(first, self.start_pulse_id)
        if self.stop_pulse_id is not None:
            last = min(last, self.stop_pulse_id)
        if first > last:
            return []
        exact = count if (first, last) == (first_pulse_id, last_pulse_id) else None
        return self._record(first, last, reason, exact)

    def close(self, reason: str, head_reason: str = MissingReason.NOT_RECEIVED.value) -> list[MissingRange]:
        """At the end: the head and tail of the pulse range that never arrived.

        ``reason`` explains a tail cut off by the end of the run (source
        silent, stopped, ...); ``head_reason`` pulses before the first one
        received. A tail that a message past the stop skipped over is a
        pulse-id jump. Needs the start (or stop) as pulse ids: a range by
        time has no pulse ids to name. With a stop time as well, the tail up
        to the stop pulse is owed only if the stop pulse came first: pulses
        after the stop time (``stop_now``) were never part of the range.
        """
        found: list[MissingRange] = []
        step = self.step or 1
        tail_owed = self.stop_pulse_id is not None and (self.stop_time is None or self.ended_by_stop_pulse)
        if self.first_pulse_id is None:
            if self.start_pulse_id is not None and tail_owed:
                # Nothing of the range arrived at all.
                found += self._record(self.start_pulse_id, self.stop_pulse_id,
                                      head_reason if self.past_stop else reason)
            return found
        if self.start_pulse_id is not None and self.first_pulse_id - self.start_pulse_id >= step:
            found += self._record(self.start_pulse_id, self.first_pulse_id - 1, head_reason)
        if tail_owed and self.stop_pulse_id - self.last_pulse_id >= step:
            found += self._record(self.last_pulse_id + 1, self.stop_pulse_id,
                                  MissingReason.PULSE_ID_JUMP.value if self.past_stop else reason)
        return found

    # -- helpers ---------------------------------------------------------------
    def _jump(self, previous: int, pulse_id: int) -> list[MissingRange]:
        return self._record(previous + 1, pulse_id - 1, MissingReason.PULSE_ID_JUMP.value)

    def _estimate(self, first: int, last: int) -> int:
        step = self.step or 1
        return max(1, (last - first + 1) // step) if step > 1 else last - first + 1

    def _record(self, first: int, last: int, reason: str, count: int | None = None) -> list[MissingRange]:
        pieces = self._uncovered(first, last)
        found = []
        for piece_first, piece_last in pieces:
            piece_count = count if (count is not None and len(pieces) == 1
                                    and (piece_first, piece_last) == (first, last)) else None
            if piece_count is None:
                piece_count = self._estimate(piece_first, piece_last)
            item = MissingRange(piece_first, piece_last, piece_count, reason)
            self._covered.append((piece_first, piece_last))
            self.missing.append(item)
            found.append(item)
        return found

    def _uncovered(self, first: int, last: int) -> list[tuple[int, int]]:
        pieces = [(first, last)]
        for covered_first, covered_last in self._covered:
            if covered_last < first or covered_first > last:
                continue
            next_pieces = []
            for piece_first, piece_last in pieces:
                if covered_last < piece_first or covered_first > piece_last:
                    next_pieces.append((piece_first, piece_last))
                    continue
                if piece_first < covered_first:
                    next_pieces.append((piece_first, covered_first - 1))
                if covered_last < piece_last:
                    next_pieces.append((covered_last + 1, piece_last))
            pieces = next_pieces
            if not pieces:
                break
        return pieces
