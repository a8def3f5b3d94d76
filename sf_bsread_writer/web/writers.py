"""The writers reading from the buffer now, as the status page shows them (pure).

The buffer's status lists its replay sessions (``SessionStatus``): the
requested range, the last pulse id sent, counts, and the session's label,
which a writer sets to its output file (docs/replay-protocol.md). What an
operator wants besides, how far along and how fast, is decided here from
consecutive snapshots, with the time passed in: no I/O, no clock.

Progress is the part of the requested range sent: by pulse id when the
range has both ends as pulse ids, by time when it has both as times, else
unknown (an open range has no end to measure against). After a re-request
(a buffer restart) the session starts again at the rest of the range, so
its progress counts from there. Memory: one rate estimator per session in
the latest snapshot; ended sessions are forgotten.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sf_bsread_writer.rates import RateEstimator
from sf_bsread_writer.status import SessionStatus

__all__ = ["WriterRow", "WriterRows", "progress", "requested_range", "RATE_WINDOW_SECONDS"]

#: The rate shown is over about this many seconds of snapshots.
RATE_WINDOW_SECONDS = 5.0


@dataclass(frozen=True)
class WriterRow:
    """One row of the page's writers table (``writers`` in ``GET /api/v1/status``)."""

    session: str
    file: str | None  # the session's label: a writer's output file; null for clients that set none
    requested: str  # "START .. STOP" (pulse ids or times; "open" without a stop)
    last_pulse_id: int | None
    progress: float | None  # 0..1 of the requested range sent; null when unknown
    rate: float | None  # messages sent per second, over the last few seconds; null until two snapshots
    sent: int
    in_flight: int
    gaps: int
    lost: int
    ended: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def requested_range(session: SessionStatus) -> str:
    start = session.start_pulse_id if session.start_pulse_id is not None else session.start_time
    stop = session.stop_pulse_id if session.stop_pulse_id is not None else session.stop_time
    return f"{start if start is not None else '-'} .. {stop if stop is not None else 'open'}"


def progress(session: SessionStatus) -> float | None:
    """The part of the requested range sent (0..1), or None when it cannot be measured."""
    if session.ended is not None and session.ended.startswith("stop"):
        return 1.0
    if session.start_pulse_id is not None and session.stop_pulse_id is not None:
        if session.last_pulse_id is None:
            return 0.0
        done = (session.last_pulse_id - session.start_pulse_id + 1) / (session.stop_pulse_id - session.start_pulse_id + 1)
    elif session.start_time is not None and session.stop_time is not None:
        if session.last_time is None:
            return 0.0
        span = session.stop_time - session.start_time
        done = (session.last_time - session.start_time) / span if span > 0 else 1.0
    else:
        return None
    return min(1.0, max(0.0, done))


class WriterRows:
    """Rows from successive snapshots: the rate of each session is the change of its ``sent`` over time."""

    def __init__(self, window: float = RATE_WINDOW_SECONDS) -> None:
        self.window = window
        self._rates: dict[str, RateEstimator] = {}

    def rows(self, sessions: Sequence[SessionStatus], now: float) -> list[WriterRow]:
        rates = {}
        found = []
        for session in sessions:
            estimator = self._rates.get(session.session) or RateEstimator(self.window)
            estimator.add(now, session.sent)
            rates[session.session] = estimator
            measured = estimator.rates()
            found.append(WriterRow(
                session=session.session, file=session.label, requested=requested_range(session),
                last_pulse_id=session.last_pulse_id, progress=progress(session),
                rate=measured[0] if measured is not None else None, sent=session.sent, in_flight=session.in_flight,
                gaps=session.gaps, lost=session.lost, ended=session.ended))
        self._rates = rates  # sessions no longer listed are forgotten
        return found
