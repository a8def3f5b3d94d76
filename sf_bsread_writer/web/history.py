"""The recent past of the status page's plots (pure): scalar values and the buffer's rates, bounded.

Why the web service keeps it and does not replay it from the buffer: a page
opens with up to 40 sparklines and the rate plots; replaying the last
minutes of 40 channels is thousands of messages per page load, while a
sample every ``resolution`` seconds of each scalar channel is a few kB per
channel, taken from the feed the service reads anyway. So the plots start
with the last ``span`` seconds (as far back as the service has run: it
starts with the buffer), not empty.

Bounds, whatever the stream: at most ``max_channels`` channels (the first
numeric scalar channels seen; others are not held and say so), each a
circular array of ``span / resolution`` points; the rates one point per
status poll, ``span`` seconds. Memory: ``max_channels * points * 24`` bytes
at most (1000 channels, 600 points: 14 MB). No I/O and no clock: the feed's
time comes in as ``now``.
"""
from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sf_bsread_writer.bsread.message import Message

__all__ = ["ValueHistory", "RateHistory", "is_plotted", "DEFAULT_SPAN_SECONDS", "DEFAULT_RESOLUTION_SECONDS",
           "DEFAULT_MAX_CHANNELS"]

DEFAULT_SPAN_SECONDS = 300.0
DEFAULT_RESOLUTION_SECONDS = 0.5
DEFAULT_MAX_CHANNELS = 1000

_NUMERIC = {"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32",
            "float64"}


def is_plotted(spec: Any) -> bool:
    """A channel the page plots over time: a numeric scalar."""
    return spec.type in _NUMERIC and tuple(spec.shape) == (1,)


class _Series:
    """One channel's samples: pulse id, timestamp (s) and value, 24 bytes a point. The arrays grow as
    samples come (memory follows what is held, no allocation of the whole span at a channel's first
    value), then are overwritten in a circle once ``points`` are held."""

    def __init__(self, points: int) -> None:
        self.points = points
        self.pulse_ids = array("q")
        self.timestamps = array("d")
        self.values = array("d")
        self.count = 0  # samples ever added
        self.last_taken = -math.inf  # the feed's time of the last sample

    def add(self, pulse_id: int, timestamp: float, value: float) -> None:
        if self.count < self.points:
            self.pulse_ids.append(pulse_id)
            self.timestamps.append(timestamp)
            self.values.append(value)
        else:
            index = self.count % self.points
            self.pulse_ids[index], self.timestamps[index], self.values[index] = pulse_id, timestamp, value
        self.count += 1

    def ordered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        arrays = (np.frombuffer(self.pulse_ids, dtype=np.int64), np.frombuffer(self.timestamps, dtype=np.float64),
                  np.frombuffer(self.values, dtype=np.float64))
        if self.count <= self.points:
            return tuple(array_.copy() for array_ in arrays)  # type: ignore[return-value]
        oldest = self.count % self.points
        return tuple(np.concatenate([array_[oldest:], array_[:oldest]]) for array_ in arrays)  # type: ignore


class ValueHistory:
    """Samples of every numeric scalar channel, one per ``resolution`` seconds, the last ``span`` seconds."""

    def __init__(self, span: float = DEFAULT_SPAN_SECONDS, resolution: float = DEFAULT_RESOLUTION_SECONDS,
                 max_channels: int = DEFAULT_MAX_CHANNELS) -> None:
        self.span = span
        self.resolution = resolution
        self.max_channels = max_channels
        self.points = max(2, int(math.ceil(span / resolution)))
        self._series: dict[str, _Series] = {}
        self.not_held = 0  # channels refused for max_channels (counted once each)
        self._refused: set[str] = set()
        self._header: Any = None
        self._plotted: list[tuple[int, str]] = []  # (index, name) of the current header's plotted channels

    def add(self, message: Message, now: float) -> None:
        """Take a sample of each plotted channel present in ``message`` whose last sample is ``resolution`` old."""
        header = message.data_header
        if header is not self._header:  # once per data header, not per message
            self._header = header
            self._plotted = [(index, spec.name) for index, spec in enumerate(header.channels) if is_plotted(spec)]
        for index, name in self._plotted:
            series = self._series.get(name)
            if series is not None and now - series.last_taken < self.resolution:
                continue
            if not message.is_present(index):
                continue
            if series is None:
                if len(self._series) >= self.max_channels:
                    if name not in self._refused and len(self._refused) < self.max_channels:
                        self._refused.add(name)
                        self.not_held += 1
                    continue
                series = self._series[name] = _Series(self.points)
            try:
                value = float(np.asarray(message.value(index)).reshape(-1)[0])
            except Exception:  # a value that does not decode is not plotted (the table says why)
                continue
            series.last_taken = now
            series.add(message.pulse_id, message.channel_seconds(index), value)

    def forget_absent(self, names: Iterable[str]) -> None:
        """Keep only channels of the stream's current data header (a removed channel's history goes)."""
        keep = set(names)
        for name in [name for name in self._series if name not in keep]:
            del self._series[name]
        self._refused &= keep

    def held(self, name: str) -> bool:
        return name in self._series

    def document(self, names: Sequence[str], newest_time: float | None) -> dict[str, Any]:
        """``{"channels": {name: {"pulse_id", "timestamp", "value"}}, "not_held": [...]}``: samples no older
        than ``span`` before ``newest_time`` (the feed's newest message time; None: all held). Non-finite
        values become null (JSON has no NaN)."""
        channels: dict[str, Any] = {}
        not_held = []
        for name in names:
            series = self._series.get(name)
            if series is None:
                not_held.append(name)
                continue
            pulse_ids, timestamps, values = series.ordered()
            if newest_time is not None:
                recent = timestamps >= newest_time - self.span
                pulse_ids, timestamps, values = pulse_ids[recent], timestamps[recent], values[recent]
            channels[name] = {"pulse_id": pulse_ids.tolist(), "timestamp": timestamps.tolist(),
                              "value": [value if math.isfinite(value) else None for value in values.tolist()]}
        return {"channels": channels, "not_held": not_held}


@dataclass(frozen=True)
class RatePoint:
    time: float  # the buffer's status time (s since the epoch)
    messages_per_second: float
    bytes_per_second: float


class RateHistory:
    """The buffer's rates as the service polled them: one point a poll, the last ``span`` seconds."""

    def __init__(self, span: float = DEFAULT_SPAN_SECONDS, max_points: int = 3600) -> None:
        self.span = span
        self.max_points = max_points
        self._points: list[RatePoint] = []

    def add(self, time: float, messages_per_second: float, bytes_per_second: float) -> None:
        if self._points and time <= self._points[-1].time:
            return  # the same snapshot twice (or a clock step back): one point per moment
        self._points.append(RatePoint(time, messages_per_second, bytes_per_second))
        cutoff = time - self.span
        drop = 0
        while drop < len(self._points) and (self._points[drop].time < cutoff
                                            or len(self._points) - drop > self.max_points):
            drop += 1
        del self._points[:drop]

    def document(self) -> dict[str, list[float]]:
        return {"time": [point.time for point in self._points],
                "messages_per_second": [point.messages_per_second for point in self._points],
                "bytes_per_second": [point.bytes_per_second for point in self._points]}
