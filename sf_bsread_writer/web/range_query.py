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

Every parameter is untrusted text: pulse ids are plain decimal ASCII below
2**63 (the replay protocol's and the file's range), times plain decimal
numbers of seconds, channel names 1..256 characters; an unknown or repeated
parameter is refused (a misspelt ``fromat=npz`` would otherwise be ignored).
A range that cannot complete within the request's time because it lies too
far in the future (given the newest pulse id and ``now``) is refused before a
replay session is opened, so that no such request holds one of the service's
few range slots until it times out.

Channels: a requested name that is in no data header of the replayed
messages is *unknown* (:attr:`RangeColumns.unknown`, e.g. misspelt): it gets
no column, and the answer names it.
"""
from __future__ import annotations

import math
import re
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sf_bsread_writer.bsread.codecs import decode_value
from sf_bsread_writer.bsread.headers import PerHeader
from sf_bsread_writer.bsread.message import Message
from sf_bsread_writer.bsread.spec import ChannelSpec
from sf_bsread_writer.replay.messages import Gap
from sf_bsread_writer.web.live import MAX_CHANNEL_NAME, json_safe

__all__ = ["RangeQuery", "RangeQueryError", "RangeTooLarge", "RangeLimits", "RangeColumn", "RangeColumns",
           "parse_range_query", "FORMATS", "PARAMETERS", "PULSE_ID_LIMIT"]

FORMATS = ("json", "npz", "hdf5")
MAX_CHANNELS = 1000
#: Pulse ids are signed 64-bit in the replay protocol and in the file.
PULSE_ID_LIMIT = 2**63
#: The query parameters of a range (``token``: the browser's way to send the token).
PARAMETERS = ("channels", "start_pulse_id", "stop_pulse_id", "start_time", "stop_time", "format", "token")
_DECIMAL = re.compile(r"[0-9]{1,19}", re.ASCII)
_SECONDS = re.compile(r"[0-9]{1,15}(\.[0-9]{0,20})?([eE][+-]?[0-9]{1,3})?", re.ASCII)


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
    if not _DECIMAL.fullmatch(text) or int(text) >= PULSE_ID_LIMIT:
        raise RangeQueryError(f"{key}={text[:40]!r} is not an integer pulse id: decimal digits, 0 <= pulse id < 2**63")
    return int(text)


def _seconds(params: Mapping[str, str], key: str) -> float | None:
    text = params.get(key)
    if text is None or text == "":
        return None
    value = float(text) if _SECONDS.fullmatch(text) else math.nan
    if not math.isfinite(value):
        raise RangeQueryError(f"{key}={text[:40]!r} is not a time in seconds since 1970 (e.g. 1700000000.25)")
    return value


def _single_values(params: Mapping[str, str] | Any) -> dict[str, str]:
    """The query as one value per known parameter; RangeQueryError for an unknown or repeated one."""
    pairs = list(params.items())  # a MultiDict's items() has every occurrence
    values: dict[str, str] = {}
    for key, value in pairs:
        if key not in PARAMETERS:
            raise RangeQueryError(f"unknown parameter {key[:40]!r}: a range takes {', '.join(PARAMETERS[:-1])}")
        if key in values:
            raise RangeQueryError(f"{key} is given more than once")
        values[key] = value
    return values


def parse_range_query(params: Mapping[str, str], limits: RangeLimits, *, newest_pulse_id: int | None = None,
                      now: float | None = None, max_wait: float | None = None) -> RangeQuery:
    """The query of ``GET /api/v1/range``; raises RangeQueryError (400) or RangeTooLarge (413).

    ``newest_pulse_id`` (the newest pulse the service has seen, if any), ``now`` (seconds since 1970) and
    ``max_wait`` (the request's timeout): a range whose end cannot arrive in time is refused (400) here,
    not after holding a replay session for ``max_wait``. A pulse-id range may end at most
    ``limits.max_pulses`` after the newest pulse id.
    """
    params = _single_values(params)
    names = [name for name in (params.get("channels") or "").split(",") if name]
    if not names:
        raise RangeQueryError("channels=A,B is required: the channel names, comma separated")
    if len(names) > MAX_CHANNELS:
        raise RangeTooLarge(f"{len(names)} channels asked; at most {MAX_CHANNELS} per request")
    if any(len(name) > MAX_CHANNEL_NAME for name in names):
        raise RangeQueryError(f"a channel name is longer than {MAX_CHANNEL_NAME} characters")
    fmt = params.get("format") or "json"
    if fmt not in FORMATS:
        raise RangeQueryError(f"format={fmt[:40]!r} is not one of {', '.join(FORMATS)}")
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
        if newest_pulse_id is not None and stop_pulse_id > newest_pulse_id + limits.max_pulses:
            raise RangeQueryError(f"stop_pulse_id {stop_pulse_id} is {stop_pulse_id - newest_pulse_id} pulse ids "
                                  f"after the newest pulse id ({newest_pulse_id}): a past range ends at most "
                                  f"{limits.max_pulses} after it")
    else:
        if start_time is None or stop_time is None:
            raise RangeQueryError("give both start_time and stop_time")
        if stop_time < start_time:
            raise RangeQueryError(f"stop_time {stop_time} is before start_time {start_time}")
        if now is not None and max_wait is not None and stop_time > now + max_wait:
            raise RangeQueryError(f"stop_time {stop_time:.3f} is {stop_time - now:.3g} s in the future: the range "
                                  f"cannot complete within the {max_wait:g} s a request may take")
    return RangeQuery(tuple(dict.fromkeys(names)), start_pulse_id, stop_pulse_id, start_time, stop_time, fmt)


class RangeColumn:
    """One requested channel's values in a range, kept as they arrived until the answer is encoded.

    Why raw: a range of 10 000 messages x 100 scalar channels is a million
    values; decoding each into its own numpy array (and its timestamp with
    ``struct``) cost ~6 us a value, most of a range's time. Uncompressed
    fixed-size values are appended to one ``bytearray`` per run of equal
    (dtype, shape), their rows noted, and decoded with one ``np.frombuffer``
    when the answer is built; timestamps likewise (16 bytes a row, zeros
    where absent). Everything else (strings, compressed values, a value of
    the wrong size) is decoded as it arrives, as before: a corrupt one is
    absent, and its decoded size is what the byte limit counts.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._runs: list[_RawRun] = []  # uncompressed fixed-size values, in row order within a run
        self._decoded: dict[int, Any] = {}  # row -> value decoded on arrival (strings, compressed ...)
        self._present_rows: array = array("q")  # rows with a value (decode=False: with a value part)
        self._stamps = bytearray()  # 16 bytes per row: the channel's (sec, ns) as sent, zeros if absent
        self._stamp_big = bytearray()  # per row: 1 if those bytes are big-endian
        self.rows = 0

    # -- collecting (RangeColumns.add) ---------------------------------------
    def _raw_run(self, spec: ChannelSpec) -> "_RawRun":
        run = self._runs[-1] if self._runs else None
        if run is not None and run.spec is spec:
            return run
        if run is None or run.dtype != spec.dtype or run.shape != spec.array_shape:
            run = _RawRun(spec.dtype, spec.array_shape)
            self._runs.append(run)
        run.spec = spec  # the next value of the same header is known at a glance
        return run

    # -- reading ------------------------------------------------------------
    def present(self) -> np.ndarray:
        mask = np.zeros(self.rows, dtype=bool)
        mask[np.frombuffer(self._present_rows, dtype=np.int64)] = True
        return mask

    @property
    def has_value(self) -> bool:
        return len(self._present_rows) > 0

    def timestamps(self, message_times: np.ndarray) -> np.ndarray:
        """Per row the channel's own time in seconds, else (absent, or (0, 0): "not given") the message's."""
        raw = np.frombuffer(self._stamps, dtype=np.uint8).reshape(self.rows, 2, 8)
        little = raw.view("<i8").reshape(self.rows, 2)
        big = raw.view(">i8").reshape(self.rows, 2)
        pairs = np.where(np.frombuffer(self._stamp_big, dtype=bool)[:, None], big, little)
        given = (pairs != 0).any(axis=1)
        seconds = pairs[:, 0].astype(np.float64) + pairs[:, 1].astype(np.float64) * 1e-9
        return np.where(given, seconds, message_times)

    def first_value(self) -> Any:
        """The value of the first present row (None: no value), without decoding the others."""
        first_run = min((run for run in self._runs if len(run.rows)), key=lambda run: run.rows[0], default=None)
        first_decoded = min(self._decoded, default=None)
        if first_run is not None and (first_decoded is None or first_run.rows[0] < first_decoded):
            return first_run.decoded()[0]
        return None if first_decoded is None else self._decoded[first_decoded]

    def values(self) -> dict[int, Any]:
        """row -> decoded value, every present row (numpy arrays of the value shape, or str)."""
        out = dict(self._decoded)
        for run in self._runs:
            for row, value in zip(run.rows, run.decoded()):
                out[row] = value
        return out

    def json_data(self) -> list[Any]:
        """The JSON ``data`` column: one entry per row, null where absent (``web.live.json_safe`` per value)."""
        data: list[Any] = [None] * self.rows
        for run in self._runs:
            block = run.decoded()
            if block.size and block.dtype.kind == "f" and not np.isfinite(block).all():
                listed = block.astype(object)
                listed[~np.isfinite(block)] = None
                items = listed.tolist()
            else:
                items = block.tolist()
            if run.shape == (1,):  # a 1-element value is a number (json_safe)
                items = [item[0] for item in items]
            for row, item in zip(run.rows, items):
                data[row] = item
        for row, value in self._decoded.items():
            data[row] = json_safe(value, sys.maxsize)[0]
        return data


class _RawRun:
    """Consecutive raw values of one (dtype, value shape), concatenated, and their rows."""

    __slots__ = ("dtype", "shape", "data", "rows", "spec")

    def __init__(self, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.spec: ChannelSpec | None = None
        self.dtype = dtype
        self.shape = shape
        self.data = bytearray()
        self.rows = array("q")

    def decoded(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=self.dtype).reshape(len(self.rows), *self.shape)


_NO_STAMP = bytes(16)


@dataclass
class RangeColumns:
    """What a range collected: per requested channel its columns (one row per replayed message), and gaps."""

    query: RangeQuery
    limits: RangeLimits
    decode: bool = True  # False: presence and pulse ids only (the HDF5 encoding takes the raw parts)
    columns: dict[str, RangeColumn] = field(default_factory=dict)
    missing: list[dict[str, Any]] = field(default_factory=list)
    messages: int = 0
    value_bytes: int = 0

    def __post_init__(self) -> None:
        self.columns = {name: RangeColumn(name) for name in self.query.channels}
        self._in_stream: set[str] = set()  # requested names found in a data header of the range
        self._pulse_ids = array("q")
        self._message_times = array("d")
        # per data header: (column, channel index or None, its spec or None) of every requested channel
        self._plan = PerHeader(self._make_plan)

    @property
    def pulse_ids(self) -> np.ndarray:
        return np.frombuffer(self._pulse_ids, dtype=np.int64)

    @property
    def message_times(self) -> np.ndarray:
        return np.frombuffer(self._message_times, dtype=np.float64)

    def _make_plan(self, header: Any) -> list[tuple[RangeColumn, int | None, ChannelSpec | None]]:
        plan = []
        for name, column in self.columns.items():
            index = header.index_of(name) if name in header else None
            if index is not None:
                self._in_stream.add(name)
            plan.append((column, index, None if index is None else header.channels[index]))
        return plan

    def add(self, message: Message) -> None:
        """One replayed message: a row in every requested channel (absent where it is not present)."""
        self.messages += 1
        if self.messages > self.limits.max_messages:
            raise RangeTooLarge(f"more than {self.limits.max_messages} messages in the range; "
                                "ask for a shorter one")
        row = self.messages - 1
        self._pulse_ids.append(message.pulse_id)
        self._message_times.append(message.timestamp)
        frames = message.frames
        decode = self.decode
        raw_bytes = 0  # uncompressed and undecoded value bytes of this message, counted once below
        # The hot loop (a million values for 10k x 100): it fills the RangeColumn's fields itself.
        for column, index, spec in self._plan(message.data_header):
            column.rows = row + 1
            stamp = _NO_STAMP
            big = 0
            if index is not None:
                part = frames[2 + 2 * index]
                size = part.nbytes if type(part) is memoryview else len(part)
                if size:
                    present = True
                    if not decode:
                        raw_bytes += size
                    elif (size == spec.nbytes and spec.compression == "none"):  # is_string: nbytes None
                        raw_bytes += size
                        run = column._raw_run(spec)
                        run.data += part
                        run.rows.append(row)
                    else:
                        try:
                            value = decode_value(spec, part)
                        except Exception:  # a corrupt part: absent in the answer, as in the writer's file
                            present = False
                            self._count(size)
                        else:
                            # Decoded size: a compressed image of zeros is small on the wire, not here.
                            self._count(len(value.encode("utf-8")) if isinstance(value, str) else int(value.nbytes))
                            column._decoded[row] = value
                    if present:
                        column._present_rows.append(row)
                        stamp_part = frames[3 + 2 * index]
                        if (stamp_part.nbytes if type(stamp_part) is memoryview else len(stamp_part)) == 16:
                            stamp = stamp_part
                            big = spec.encoding == "big"
            column._stamps += stamp
            column._stamp_big.append(big)
        self._count(raw_bytes)

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

    @property
    def unknown(self) -> list[str]:
        """Requested names in no data header of the range (misspelt, or not in the stream then), in request
        order; empty when no message came (then nothing can be said: see ``missing``)."""
        if not self.messages:
            return []
        return [name for name in self.columns if name not in self._in_stream]

    @property
    def known(self) -> list[str]:
        """The requested names that are not :attr:`unknown`: the columns of the answer."""
        unknown = set(self.unknown)
        return [name for name in self.columns if name not in unknown]

    def finish(self) -> None:
        """Known channels without a single value in the range are listed in ``missing`` too
        (``no_value_in_range``); unknown ones are named in :attr:`unknown` instead."""
        unknown = set(self.unknown)
        for name, column in self.columns.items():
            column.rows = self.messages
            if not column.has_value and name not in unknown:
                self.missing.append({"channel": name, "reason": "no_value_in_range"})

    def timestamps(self, name: str) -> np.ndarray:
        return self.columns[name].timestamps(self.message_times)

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        """One channel's columns as numpy arrays; ``data`` has the value shape, zeros where absent.

        The first value decides dtype and shape; a value of another shape (a
        retype: see format=hdf5) is absent here, one of another dtype is cast.
        """
        column = self.columns[name]
        present = column.present()
        sample = column.first_value()
        if sample is None:
            data = np.zeros(column.rows, dtype=np.float64)
        elif isinstance(sample, str):
            values = column.values()
            data = np.asarray([values.get(row, "") for row in range(column.rows)], dtype=str)
        else:
            sample_array = np.asarray(sample)
            data = np.zeros((column.rows, *sample_array.shape), dtype=sample_array.dtype.newbyteorder("="))
            for run in column._runs:
                if run.shape == sample_array.shape:
                    data[np.frombuffer(run.rows, dtype=np.int64)] = run.decoded()
                else:
                    present[np.frombuffer(run.rows, dtype=np.int64)] = False
            for row, value in column._decoded.items():
                value_array = np.asarray(value)
                if value_array.shape == sample_array.shape:
                    data[row] = value_array
                else:
                    present[row] = False
        return {"pulse_id": self.pulse_ids.copy(), "timestamp": self.timestamps(name),
                "is_data_present": present, "data": data}
