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

__all__ = ["RateEstimator"]


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

    def add(self, now: float, *totals: int) -> None:
        """Record the running totals at ``now`` (non-decreasing times)."""
        samples = self._samples
        if samples and now - samples[-1][0] < self.resolution:
            return
        samples.append((now, totals))
        while len(samples) > 2 and now - samples[0][0] > self.window:
            samples.popleft()

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
