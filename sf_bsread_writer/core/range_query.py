"""A past range of channels over HTTP (pure): the query, its limits, and the columns it collects.

``GET /api/v1/range`` (docs/web-api.md) asks the buffer's replay endpoint for
a pulse-id or time range and answers with per-channel columns. This module
parses and bounds the query (every error says what to fix) and collects the
replayed messages into columns; ``web/ranges.py`` does the replay I/O and
the encodings (JSON, npz, HDF5).

Bounds, so that no request can take the service's memory: the pulse-id span
(``stop - start + 1``) is checked before anything is fetched; messages and
value bytes while collecting. Over a bound: :class:`RangeTooLarge` (HTTP
413, with the limit in its message).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .protocol import Message
from .replay_messages import Gap

__all__ = ["RangeQuery", "RangeQueryError", "RangeTooLarge", "RangeLimits", "RangeColumns", "parse_range_query",
           "FORMATS"]

FORMATS = ("json", "npz", "hdf5")
MAX_CHANNELS = 1000


class RangeQueryError(ValueError):
    """A malformed range request (HTTP 400); the message says what to fix."""


class RangeTooLarge(ValueError):
    """A range over the service's limits (HTTP 413); the message names the limit."""


@dataclass(frozen=True)
class RangeLimits:
    max_pulses: int = 100_000  # pulse-id span of one request
    max_messages: int = 100_000
    max_bytes: int = 256 * 1024 * 1024  # value bytes of the requested channels (decoded, where decoded)
    max_json_bytes: int = 32 * 1024 * 1024  # the same for format=json, whose text is ~3x and built in memory


@dataclass(frozen=True)
class RangeQuery:
    channels: tuple[str, ...]
    start_pulse_id: int | None = None
    stop_pulse_id: int | None = None
    start_time: float | None = None
    stop_time: float | None = None
    format: str = "json"


def _integer(params: Mapping[str, str], key: str) -> int | None:
    text = params.get(key)
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise RangeQueryError(f"{key}={text!r} is not an integer pulse id") from None
    if value < 0:
        raise RangeQueryError(f"{key}={text!r}: pulse ids are >= 0")
    return value


def _seconds(params: Mapping[str, str], key: str) -> float | None:
    text = params.get(key)
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise RangeQueryError(f"{key}={text!r} is not a time in seconds since 1970 (e.g. 1700000000.25)") from None
    if not math.isfinite(value) or value < 0:
        raise RangeQueryError(f"{key}={text!r} is not a time in seconds since 1970")
    return value


def parse_range_query(params: Mapping[str, str], limits: RangeLimits) -> RangeQuery:
    """The query of ``GET /api/v1/range``; raises RangeQueryError (400) or RangeTooLarge (413)."""
    names = [name for name in (params.get("channels") or "").split(",") if name]
    if not names:
        raise RangeQueryError("channels=A,B is required: the channel names, comma separated")
    if len(names) > MAX_CHANNELS:
        raise RangeTooLarge(f"{len(names)} channels asked; at most {MAX_CHANNELS} per request")
    fmt = params.get("format") or "json"
    if fmt not in FORMATS:
        raise RangeQueryError(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
    start_pulse_id, stop_pulse_id = _integer(params, "start_pulse_id"), _integer(params, "stop_pulse_id")
    start_time, stop_time = _seconds(params, "start_time"), _seconds(params, "stop_time")
    by_pulse = start_pulse_id is not None or stop_pulse_id is not None
    by_time = start_time is not None or stop_time is not None
    if by_pulse == by_time:
        raise RangeQueryError("give either start_pulse_id and stop_pulse_id, or start_time and stop_time")
    if by_pulse:
        if start_pulse_id is None or stop_pulse_id is None:
            raise RangeQueryError("give both start_pulse_id and stop_pulse_id")
        if stop_pulse_id < start_pulse_id:
            raise RangeQueryError(f"stop_pulse_id {stop_pulse_id} is before start_pulse_id {start_pulse_id}")
        span = stop_pulse_id - start_pulse_id + 1
        if span > limits.max_pulses:
            raise RangeTooLarge(f"the range spans {span} pulse ids; at most {limits.max_pulses} per request "
                                "(ask for several smaller ranges)")
    else:
        if start_time is None or stop_time is None:
            raise RangeQueryError("give both start_time and stop_time")
        if stop_time < start_time:
            raise RangeQueryError(f"stop_time {stop_time} is before start_time {start_time}")
    return RangeQuery(tuple(dict.fromkeys(names)), start_pulse_id, stop_pulse_id, start_time, stop_time, fmt)


@dataclass
class _Column:
    pulse_id: list[int] = field(default_factory=list)
    timestamp: list[float] = field(default_factory=list)
    is_data_present: list[bool] = field(default_factory=list)
    data: list[Any] = field(default_factory=list)  # decoded values, None where absent


@dataclass
class RangeColumns:
    """What a range collected: per requested channel its columns (one row per replayed message), and gaps."""

    query: RangeQuery
    limits: RangeLimits
    decode: bool = True  # False: presence and pulse ids only (the HDF5 encoding takes the raw parts)
    columns: dict[str, _Column] = field(default_factory=dict)
    missing: list[dict[str, Any]] = field(default_factory=list)
    messages: int = 0
    value_bytes: int = 0

    def __post_init__(self) -> None:
        self.columns = {name: _Column() for name in self.query.channels}

    def add(self, message: Message) -> None:
        """One replayed message: a row in every requested channel (absent where it is not present)."""
        self.messages += 1
        if self.messages > self.limits.max_messages:
            raise RangeTooLarge(f"more than {self.limits.max_messages} messages in the range; "
                                "ask for a shorter one")
        header = message.data_header
        for name, column in self.columns.items():
            index = header.index_of(name) if name in header else None
            present = index is not None and message.is_present(index)
            value = None
            stamp = message.timestamp
            if present:
                raw_bytes = len(message.value_part(index))
                if self.decode:
                    try:
                        value = message.value(index)
                    except Exception:  # a corrupt part: absent in the answer, as in the writer's file
                        present = False
                # Decoded size where decoded: a compressed image of zeros is small on the wire, not here.
                self._count(raw_bytes if value is None else
                            len(value.encode("utf-8")) if isinstance(value, str) else int(value.nbytes))
                stamp = message.channel_seconds(index)
            column.pulse_id.append(message.pulse_id)
            column.timestamp.append(stamp)
            column.is_data_present.append(present)
            column.data.append(value if present else None)

    def _count(self, nbytes: int) -> None:
        self.value_bytes += nbytes
        limit = self.limits.max_bytes
        if self.query.format == "json":
            limit = min(limit, self.limits.max_json_bytes)
        if self.value_bytes > limit:
            raise RangeTooLarge(f"the range holds more than {limit} bytes of values"
                                + (" for format=json (npz and hdf5 allow more)" if self.query.format == "json" else "")
                                + "; ask for fewer channels or a shorter range")

    def gap(self, gap: Gap) -> None:
        """Pulses that will never come (evicted, before the buffer, a source reset)."""
        self.missing.append({"first_pulse_id": gap.first_pulse_id, "last_pulse_id": gap.last_pulse_id,
                             "reason": gap.reason, "count": gap.count})

    def finish(self) -> None:
        """Channels without a single value in the range are listed in ``missing`` too (``no_value_in_range``)."""
        for name, column in self.columns.items():
            if not any(column.is_data_present):
                self.missing.append({"channel": name, "reason": "no_value_in_range"})

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        """One channel's columns as numpy arrays; ``data`` has the value shape, zeros where absent."""
        column = self.columns[name]
        present = np.asarray(column.is_data_present, dtype=bool)
        sample = next((value for value in column.data if value is not None), None)
        if sample is None:
            data = np.zeros(len(column.data), dtype=np.float64)
        elif isinstance(sample, str):
            data = np.asarray(["" if value is None else value for value in column.data], dtype=str)
        else:
            sample_array = np.asarray(sample)
            data = np.zeros((len(column.data), *sample_array.shape), dtype=sample_array.dtype.newbyteorder("="))
            for row, value in enumerate(column.data):
                if value is not None:
                    array = np.asarray(value)
                    if array.shape == sample_array.shape:
                        data[row] = array
                    else:
                        present[row] = False  # a value of another shape (a retype): see format=hdf5
        return {"pulse_id": np.asarray(column.pulse_id, dtype=np.int64),
                "timestamp": np.asarray(column.timestamp, dtype=np.float64),
                "is_data_present": present, "data": data}
