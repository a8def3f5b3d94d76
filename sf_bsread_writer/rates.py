"""Rates of cumulative counters over a sliding time window (pure: ``now`` is an argument).

The one estimator behind every "per second" the product shows: the
buffer's message and byte rates, the gateway's own receive rate and the
writer's write rate. A caller keeps its counters as running totals and
hands them in with the time; the estimator keeps a few samples and answers
the average rate over the window. Totals, not increments, so a missed
sample costs resolution, never correctness.
"""
from __future__ import annotations

from collections import deque

__all__ = ["RateEstimator", "RateGrid", "SparseAwareGrid"]


class RateEstimator:
    """Per-second rates of ``n`` running totals over the last ``window`` seconds.

    ``resolution``: samples closer than this to the previous one are not
    kept (the newest totals still count at the next kept sample), which
    bounds the memory to ``window / resolution`` samples however often
    :meth:`add` is called, e.g. once per message.
    """

    def __init__(self, window: float = 5.0, resolution: float = 0.0) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, not {window}")
        self.window = float(window)
        self.resolution = float(resolution)
        self._samples: deque[tuple[float, tuple[int, ...]]] = deque()

    def add(self, now: float, *totals: int) -> bool:
        """Record the running totals at ``now`` (non-decreasing times).

        False when the sample was dropped (within ``resolution`` of the last
        one): the rates are then what they were, and a caller that adds per
        message need not read them again.
        """
        samples = self._samples
        if samples and now - samples[-1][0] < self.resolution:
            return False
        samples.append((now, totals))
        while len(samples) > 2 and now - samples[0][0] > self.window:
            samples.popleft()
        return True

    @property
    def span(self) -> float:
        """Seconds between the oldest and the newest sample kept (0.0 with fewer than two)."""
        if len(self._samples) < 2:
            return 0.0
        return self._samples[-1][0] - self._samples[0][0]

    def rates(self) -> tuple[float, ...] | None:
        """Per-second rate of each total over the span; None until two samples lie apart in time."""
        span = self.span
        if span <= 0:
            return None
        (_, first), (_, last) = self._samples[0], self._samples[-1]
        return tuple((end - start) / span for start, end in zip(first, last))

    def rate(self) -> float | None:
        """The rate of the first total (see :meth:`rates`)."""
        rates = self.rates()
        return rates[0] if rates else None


class RateGrid:
    """At most ``max_rate`` events a second out of a faster (jittery) stream: which ones to take.

    Takes keep to a grid of ``1/max_rate`` with half an interval of tolerance:
    a source at exactly the limit (100 Hz into --ca-max-rate 100) arrives with
    jitter, and timing each take from the previous arrival would skip every
    event that comes a little early. Each take moves the grid on by a whole
    interval, so the average never exceeds the limit. ``max_rate`` <= 0: take all.
    """

    def __init__(self, max_rate: float) -> None:
        self.interval = 1.0 / max_rate if max_rate > 0 else 0.0
        self._next = float("-inf")

    def take(self, now: float) -> bool:
        """True when an event arriving at ``now`` is to be taken (and the grid moves on)."""
        interval = self.interval
        if now + interval / 2 < self._next:
            return False
        self._next = max(self._next, now - interval / 2) + interval
        return True


class SparseAwareGrid:
    """A :class:`RateGrid` that does not lose sparse channels: which messages a rate-limited feed takes.

    A channel sent every Nth pulse (bsread ``modulo``) may never be in the
    messages a plain grid picks: at 10 of 100 messages a second, the grid
    locks onto pulses where it is absent, and the CA gateway or a web client
    never sees it. So besides the messages on the grid, a message is taken
    when it carries a channel that the last taken message lacked
    (``presence``: a bit per channel, ``bsread.parts.Layout.presence``), up to
    ``extra_factor`` times ``max_rate`` more a second: the total stays bounded
    whatever the stream does.
    """

    def __init__(self, max_rate: float, extra_factor: float = 3.0) -> None:
        self._grid = RateGrid(max_rate)
        self._extra = RateGrid(max_rate * extra_factor if max_rate > 0 else 0.0)
        self._taken_presence = -1  # everything: nothing is missing before the first message
        self.extra_taken = 0

    def take(self, now: float, presence: int) -> bool:
        if self._grid.take(now):
            self._taken_presence = presence
            return True
        if presence & ~self._taken_presence and self._extra.take(now):
            self.extra_taken += 1
            self._taken_presence = presence
            return True
        return False
