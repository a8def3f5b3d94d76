"""The SwissFEL HDF5 file layout: one row per bsread message, written in blocks.

:class:`H5File` is the only thing the writer needs: it takes parsed
:class:`~sf_bsread_writer.protocol.Message` objects and turns them into the
layout of the original SwissFEL writer (``/general/*``, ``/data/<channel>/
{data,pulse_id,is_data_present}``), extended with a per-channel
``timestamp``, channel metadata attributes, file attributes and a
``/missing`` table. docs/file-format.md is the reader's reference; this
docstring is about how and why it is written the way it is.

Why blocks. The original wrote one element per channel per message (resize
+ write), about 40 messages/s for 100 channels. Here ``append`` touches no
HDF5 at all: it copies each present value part (raw bytes, already in the
channel's byte order) into a per-channel buffer. HDF5 is only written in
:meth:`H5File.flush` — one resize and one slice write per dataset per block —
which runs when a block is full (``block_rows`` rows or ``block_bytes``
bytes) or ``flush_interval`` seconds after the previous flush.

Why direct chunks. A ``bitshuffle_lz4`` value part is byte for byte one
chunk of the HDF5 bitshuffle filter (id 32008, LZ4). Array channels
compressed that way get a dataset with ``chunks=(1,) + array_shape`` and that
filter, and each part is stored with ``write_direct_chunk``: never
decompressed. When :func:`protocol.direct_chunk_compatible` says no (legacy
block size, wrong size), the value is decoded and written through the
filter instead.

Why this is crash safe. The file is created with HDF5's default (earliest)
format. Every flush writes the block, updates the file attributes
(``number_of_messages`` ...) and calls ``H5Fflush``; between flushes nothing
is written at all, because values wait in memory. A process killed with
SIGKILL therefore leaves the file as of the last completed flush (plus, at
worst, raw data that no metadata points at yet), and the earliest format has
no "file open for write" superblock flag, so a plain ``h5py.File(path,
"r")`` opens it (SWMR and ``libver="latest"`` files need ``h5clear`` first
after a crash: checked with HDF5 2.0). The first ``number_of_messages`` rows
of every channel are complete; tests/test_h5format.py proves it by killing a
child writer at several moments.

Why lazy datasets. A channel's datasets are created at its first *present*
value, with the type of that value, and earlier rows read as absent (fill
value 0) — so a channel first seen absent (the Python sender announces an
absent value as ``float64 [1]``) keeps every value that arrives later. A
value whose (type, shape) differs from the channel's first one goes to a
sibling group ``/data/<channel>@2`` (``@3``...), never into a renamed
dataset: ``/data/<channel>/data`` always keeps the first type.
"""
from __future__ import annotations

import json
import logging
import math
import operator
import os
import struct
import time
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from . import protocol

__all__ = [
    "H5File",
    "MissingRange",
    "FILE_ATTRIBUTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GENERAL_FIELDS",
    "NOT_GIVEN",
    "VARIANT_SEPARATOR",
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_BLOCK_ROWS",
    "DEFAULT_BLOCK_BYTES",
    "TARGET_CHUNK_BYTES",
    "MAX_CHUNK_ROWS",
    "DIRECT_CHUNK_MIN_BYTES",
    "CHUNK_CACHE_BYTES",
    "chunk_shape",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "SwissFEL bsread"
FORMAT_VERSION = 2  # 1 = the original writer's layout; 2 = this one (a superset)

# The four /general datasets of the original format and their value when unset.
GENERAL_FIELDS = ("created", "user", "process", "instrument")
NOT_GIVEN = "not given"

# "/data/<channel>@2" holds values of a channel's second (type, shape).
VARIANT_SEPARATOR = "@"

# Every attribute a file may carry on "/", in the order of docs/file-format.md,
# which says what each one means (tests/test_h5format.py keeps the two equal).
# The first group is H5File's own; set_attributes() accepts the second group only.
OWN_ATTRIBUTES = ("format", "format_version", "number_of_messages", "first_pulse_id", "last_pulse_id",
                  "first_timestamp", "last_timestamp", "missing_pulses", "absent_values", "complete",
                  "rows_removed_after_stop")
CALLER_ATTRIBUTES = ("requested_start_pulse_id", "requested_stop_pulse_id", "requested_start_time",
                     "requested_stop_time", "end_reason", "unlocated_gaps")
FILE_ATTRIBUTES = OWN_ATTRIBUTES + CALLER_ATTRIBUTES

DEFAULT_FLUSH_INTERVAL = 1.0  # seconds: the most data a SIGKILL can cost
DEFAULT_BLOCK_ROWS = 1000  # rows held in memory before they are written
DEFAULT_BLOCK_BYTES = 64 * 1024 * 1024  # ... or this many value bytes

# Chunking of buffered datasets: about TARGET_CHUNK_BYTES per chunk, never
# more than MAX_CHUNK_ROWS rows (a chunk is allocated whole on disk even if
# the run is short), and never a chunk near HDF5's 4 GiB limit.
TARGET_CHUNK_BYTES = 1024 * 1024
MAX_CHUNK_ROWS = 1024
MAX_CHUNK_BYTES = 256 * 1024 * 1024

# A bitshuffle_lz4 array smaller than this is decoded and buffered instead
# of stored as one chunk per row (tiny chunks make a huge chunk index).
DIRECT_CHUNK_MIN_BYTES = 4096

# HDF5's raw data chunk cache, per dataset: none. The default (HDF5 2.0: 8 MiB
# and 8191 slots per dataset; 1 MiB / 521 before) only ever fills here: block
# writes go to the newest chunk, and a chunk once touched stays cached until
# its dataset's cache is full. With 4 datasets per channel that is memory that
# grows through the whole run, ~300 B per row for the demo profile (48 of 52
# datasets are scalar-sized: full only after 8 MiB / 8 B = 1M rows, ~3 h at
# 100 Hz); benchmarks/bench_h5_memory.py and docs/performance.md "Writer: RSS".
# Nothing is read back, unfiltered chunks take a block's rows straight to the
# file, and a direct-chunk or filtered row is one whole chunk, so the cache
# bought nothing (bench_h5format.py: same throughput without it).
CHUNK_CACHE_BYTES = 0
CHUNK_CACHE_SLOTS = 1

_STRING_DTYPE = h5py.string_dtype("utf-8")
_TIMESTAMP_BYTES = 16  # bsread timestamp part: int64 sec + int64 ns
_ABSENT_TIMESTAMP = bytes(_TIMESTAMP_BYTES)
_NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class MissingRange:
    """Pulses that are not in the file, and why (one row of ``/missing``).

    ``count`` is the number of pulses (messages) missing, which is not
    ``last - first + 1`` when the source's pulse step is larger than one.
    """

    first_pulse_id: int
    last_pulse_id: int
    count: int
    reason: str


_MISSING_DTYPE = np.dtype([
    ("first_pulse_id", "<i8"),
    ("last_pulse_id", "<i8"),
    ("count", "<i8"),
    ("reason", _STRING_DTYPE),
])


def chunk_shape(row_shape: tuple[int, ...], itemsize: int, *, one_row: bool = False) -> tuple[int, ...]:
    """HDF5 chunk shape for a dataset of rows of ``row_shape`` (``(n,) + row_shape``).

    About ``TARGET_CHUNK_BYTES`` per chunk, at most ``MAX_CHUNK_ROWS`` rows,
    at least one row; a single row larger than ``MAX_CHUNK_BYTES`` is split
    along its slowest axes so that no chunk approaches the 4 GiB limit (the
    original's ``(100,) + shape`` image chunks exceeded it). ``one_row``
    forces one row per chunk (direct chunk datasets).
    """
    row_bytes = max(1, itemsize * math.prod(row_shape))
    if one_row:
        rows = 1
    else:
        rows = max(1, min(MAX_CHUNK_ROWS, TARGET_CHUNK_BYTES // row_bytes))
    inner = list(row_shape)
    chunk_bytes = row_bytes * rows
    axis = 0
    while chunk_bytes > MAX_CHUNK_BYTES and axis < len(inner):
        # Halve the slowest axis still larger than 1 until the chunk fits.
        if inner[axis] > 1:
            inner[axis] = (inner[axis] + 1) // 2
            chunk_bytes = itemsize * math.prod(inner)
        else:
            axis += 1
    return (rows, *inner)


def _signature(spec: protocol.ChannelSpec) -> tuple[str, tuple[int, ...]]:
    """What must stay equal for values to share one dataset: type and shape.

    Byte order and compression are not part of it: a value can be converted
    to the dataset's byte order and decompressed without loss.
    """
    if spec.is_string:
        return ("string", ())
    return (spec.type, tuple(spec.array_shape))


def _attribute_value(value: Any) -> Any:
    """An HDF5-storable attribute value: int lists as int64 arrays, other lists/dicts as JSON text."""
    if isinstance(value, (bool, np.bool_)):
        return np.uint8(value)
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        return np.array(value, dtype="<i8")
    if isinstance(value, (int, float, str, np.integer, np.floating, np.ndarray, bytes)):
        return value
    return json.dumps(value, default=str)


class _Column:
    """One channel group (``/data/<channel>`` or a variant) and its pending rows.

    Rows are block-relative while pending: ``filled`` rows of the current
    block are accounted for; absent rows are added lazily (``_pad``) when a
    later value or the block write needs them, so an absent channel costs
    nothing per message.
    """

    kind = "buffered"

    def __init__(self, group: h5py.Group, spec: protocol.ChannelSpec, rows_written: int,
                 dtype: np.dtype, row_shape: tuple[int, ...]) -> None:
        self.group = group
        self.name = spec.name
        self.signature = _signature(spec)
        self.dtype = dtype
        self.row_shape = row_shape
        self.row_nbytes = dtype.itemsize * math.prod(row_shape) if row_shape else dtype.itemsize
        self.ts_order = ">" if spec.encoding == "big" else "<"
        self.filled = 0
        self.present = bytearray()
        self.timestamps = bytearray()
        self.data = self._create_data(group, spec, rows_written)
        self.pulse_id = group.create_dataset(
            "pulse_id", shape=(rows_written,), maxshape=(None,), dtype="<i8",
            chunks=(MAX_CHUNK_ROWS,), fillvalue=0)
        self.is_data_present = group.create_dataset(
            "is_data_present", shape=(rows_written,), maxshape=(None,), dtype="u1",
            chunks=(MAX_CHUNK_ROWS,), fillvalue=0)
        self.timestamp = group.create_dataset(
            "timestamp", shape=(rows_written,), maxshape=(None,), dtype="<i8",
            chunks=(MAX_CHUNK_ROWS,), fillvalue=0)
        self.timestamp.attrs["units"] = "ns since 1970-01-01T00:00:00Z (bsread channel timestamp)"
        for key, value in spec.metadata().items():
            group.attrs[key] = _attribute_value(value)
        group.attrs["storage"] = self.kind

    # -- subclass hooks ---------------------------------------------------
    def _create_data(self, group: h5py.Group, spec: protocol.ChannelSpec, rows: int) -> h5py.Dataset:
        raise NotImplementedError

    def _append_value(self, spec: protocol.ChannelSpec, part: Any, row: int) -> int:
        """Take one present value; return the bytes accepted (0: treat as absent)."""
        raise NotImplementedError

    def _pad_values(self, count: int) -> None:
        raise NotImplementedError

    def _write_values(self, start: int, count: int) -> int:
        """Write the pending values at file rows ``start..start+count``; return HDF5 writes."""
        raise NotImplementedError

    def _drop_values(self, keep: int) -> None:
        """Forget the pending values of block rows ``keep`` and later."""
        raise NotImplementedError

    # -- shared row bookkeeping ------------------------------------------
    def resize(self, rows: int) -> None:
        """Grow or shrink every dataset of the group to ``rows`` rows (they all share axis 0)."""
        for dataset in (self.data, self.pulse_id, self.is_data_present, self.timestamp):
            dataset.id.set_extent((rows, *dataset.shape[1:]))

    def drop_pending(self, keep: int) -> None:
        """Forget the pending rows from block row ``keep`` on (``H5File.truncate``)."""
        if self.filled > keep:
            del self.present[keep:]
            del self.timestamps[keep * _TIMESTAMP_BYTES:]
            self._drop_values(keep)
            self.filled = keep

    def _pad(self, upto: int) -> None:
        count = upto - self.filled
        if count > 0:
            self._pad_values(count)
            self.present += bytes(count)
            self.timestamps += _ABSENT_TIMESTAMP * count
            self.filled = upto

    def append(self, spec: protocol.ChannelSpec, value_part: Any, timestamp_part: Any, row: int) -> int:
        """Store the present value of ``row`` (block-relative); return its byte count."""
        self._pad(row)
        accepted = self._append_value(spec, value_part, row)
        if not accepted:
            self._pad(row + 1)
            return 0
        self.present.append(1)
        if len(timestamp_part) == _TIMESTAMP_BYTES and (">" if spec.encoding == "big" else "<") == self.ts_order:
            self.timestamps += timestamp_part
        else:
            decoded = None
            try:
                decoded = protocol.decode_timestamp(spec, timestamp_part)
            except Exception:  # a bad timestamp must not cost the value
                logger.debug("channel %s: undecodable timestamp part", self.name, exc_info=True)
            sec, ns = decoded if decoded else (0, 0)
            self.timestamps += struct.pack(self.ts_order + "qq", sec, ns)
        self.filled = row + 1
        return accepted

    def write_block(self, start: int, count: int, pulse_ids: np.ndarray) -> int:
        """Grow every dataset to ``start + count`` rows and write the block; return HDF5 writes."""
        self._pad(count)
        self.resize(start + count)
        present = np.frombuffer(self.present, dtype="u1")
        _write_rows(self.is_data_present, start, present)
        _write_rows(self.pulse_id, start, np.where(present != 0, pulse_ids, 0).astype("<i8"))
        stamps = np.frombuffer(self.timestamps, dtype=self.ts_order + "i8").reshape(count, 2)
        _write_rows(self.timestamp, start, (stamps[:, 0].astype("<i8") * _NS_PER_S + stamps[:, 1]).astype("<i8"))
        writes = 3 + self._write_values(start, count)
        self.present = bytearray()
        self.timestamps = bytearray()
        self.filled = 0
        return writes


class _FixedColumn(_Column):
    """Numeric and bool arrays/scalars: raw bytes gathered in one bytearray."""

    kind = "buffered"

    def __init__(self, group: h5py.Group, spec: protocol.ChannelSpec, rows_written: int) -> None:
        self.values = bytearray()
        super().__init__(group, spec, rows_written, np.dtype(spec.dtype), tuple(spec.array_shape))

    def _create_data(self, group: h5py.Group, spec: protocol.ChannelSpec, rows: int) -> h5py.Dataset:
        chunks = chunk_shape(self.row_shape, self.dtype.itemsize)
        return group.create_dataset(
            "data", shape=(rows, *self.row_shape), maxshape=(None, *self.row_shape),
            dtype=self.dtype, chunks=chunks, fillvalue=np.zeros((), self.dtype))

    def _append_value(self, spec: protocol.ChannelSpec, part: Any, row: int) -> int:
        # Fast path: uncompressed, right size, same dtype -> the bytes as sent.
        if spec.compression == "none" and len(part) == self.row_nbytes and spec.dtype == self.dtype:
            self.values += part
            return len(part)
        value = _decode(spec, part, self.name)
        if value is None:
            return 0
        self.values += np.ascontiguousarray(value, dtype=self.dtype).tobytes()
        return len(part)

    def _pad_values(self, count: int) -> None:
        self.values += bytes(self.row_nbytes * count)

    def _drop_values(self, keep: int) -> None:
        del self.values[keep * self.row_nbytes:]

    def append_batch(self, spec: protocol.ChannelSpec, row: int, values: np.ndarray, stamps: np.ndarray,
                     present: np.ndarray) -> None:
        """Rows ``row..row+n`` at once from the packed fast path (absent rows hold zeros)."""
        self._pad(row)
        if spec.dtype != self.dtype:  # same type, other byte order
            values = np.ascontiguousarray(values).view(spec.dtype).astype(self.dtype).view("u1")
        self.values += np.ascontiguousarray(values).tobytes()
        self.present += present.tobytes()
        spec_order = ">" if spec.encoding == "big" else "<"
        stamps = np.ascontiguousarray(stamps)
        if spec_order != self.ts_order:
            stamps = stamps.view(spec_order + "i8").astype(self.ts_order + "i8").view("u1")
        self.timestamps += stamps.tobytes()
        self.filled = row + len(present)

    def _write_values(self, start: int, count: int) -> int:
        block = np.frombuffer(self.values, dtype=self.dtype).reshape((count, *self.row_shape))
        _write_rows(self.data, start, block)
        self.values = bytearray()
        return 1


class _StringColumn(_Column):
    """Strings: vlen UTF-8, absent rows are ``""``."""

    kind = "buffered"

    def __init__(self, group: h5py.Group, spec: protocol.ChannelSpec, rows_written: int) -> None:
        self.values: list[str] = []
        super().__init__(group, spec, rows_written, np.dtype("u1"), ())

    def _create_data(self, group: h5py.Group, spec: protocol.ChannelSpec, rows: int) -> h5py.Dataset:
        return group.create_dataset("data", shape=(rows,), maxshape=(None,), dtype=_STRING_DTYPE,
                                    chunks=(MAX_CHUNK_ROWS,))

    def _append_value(self, spec: protocol.ChannelSpec, part: Any, row: int) -> int:
        if spec.is_string and spec.compression == "none":
            try:
                text = bytes(part).decode("utf-8")
            except UnicodeDecodeError:
                text = bytes(part).decode("utf-8", errors="replace")
                logger.warning("channel %s: string value is not UTF-8; stored with replacements", self.name)
        else:
            value = _decode(spec, part, self.name)
            if value is None:
                return 0
            text = value if isinstance(value, str) else str(value)
        self.values.append(text)
        return len(part)

    def _pad_values(self, count: int) -> None:
        self.values.extend([""] * count)

    def _drop_values(self, keep: int) -> None:
        del self.values[keep:]

    def _write_values(self, start: int, count: int) -> int:
        self.data[start:start + count] = np.array(self.values, dtype=object)
        self.values = []
        return 1


class _DirectChunkColumn(_Column):
    """bitshuffle_lz4 arrays: one chunk per row, value parts stored as chunks."""

    kind = "bitshuffle_lz4 direct chunk"

    def __init__(self, group: h5py.Group, spec: protocol.ChannelSpec, rows_written: int) -> None:
        self.chunks: list[tuple[int, Any]] = []  # (block row, compressed bytes as received)
        self.decoded: list[tuple[int, np.ndarray]] = []  # fallback: written through the filter
        self.direct_chunks = 0
        self.filtered_rows = 0
        super().__init__(group, spec, rows_written, np.dtype(spec.dtype), tuple(spec.array_shape))

    def _create_data(self, group: h5py.Group, spec: protocol.ChannelSpec, rows: int) -> h5py.Dataset:
        return group.create_dataset(
            "data", shape=(rows, *self.row_shape), maxshape=(None, *self.row_shape),
            dtype=self.dtype, chunks=chunk_shape(self.row_shape, self.dtype.itemsize, one_row=True),
            fillvalue=np.zeros((), self.dtype), **hdf5plugin.Bitshuffle(cname="lz4"))

    def _append_value(self, spec: protocol.ChannelSpec, part: Any, row: int) -> int:
        if (spec.compression == "bitshuffle_lz4" and spec.dtype == self.dtype
                and protocol.direct_chunk_compatible(spec, part)):
            self.chunks.append((row, part))
        else:
            value = _decode(spec, part, self.name)
            if value is None:
                return 0
            self.decoded.append((row, np.ascontiguousarray(value, dtype=self.dtype)))
        return len(part)

    def _pad_values(self, count: int) -> None:
        pass  # unwritten chunks read as the fill value 0

    def _drop_values(self, keep: int) -> None:
        self.chunks = [(row, part) for row, part in self.chunks if row < keep]
        self.decoded = [(row, value) for row, value in self.decoded if row < keep]

    def _write_values(self, start: int, count: int) -> int:
        zeros = (0,) * len(self.row_shape)
        write_chunk = self.data.id.write_direct_chunk
        for row, part in self.chunks:
            write_chunk((start + row, *zeros), part)
        for row, value in self.decoded:
            self.data[start + row] = value
        self.direct_chunks += len(self.chunks)
        self.filtered_rows += len(self.decoded)
        writes = len(self.chunks) + len(self.decoded)
        self.chunks = []
        self.decoded = []
        return writes


def _write_rows(dataset: h5py.Dataset, start: int, rows: np.ndarray) -> None:
    """Write ``rows`` (first axis = rows) at row ``start`` with h5py's low-level API.

    The high-level ``dataset[a:b] = rows`` costs ~150 us of Python per call;
    a block write makes four such calls per channel, 2000 for a 500-channel
    stream, so this is where the block write's time went.
    """
    file_space = dataset.id.get_space()
    file_space.select_hyperslab((start,) + (0,) * (rows.ndim - 1), rows.shape)
    dataset.id.write(h5py.h5s.create_simple(rows.shape), file_space, np.ascontiguousarray(rows))


def _decode(spec: protocol.ChannelSpec, part: Any, name: str) -> Any:
    """Decode a value that cannot be stored as sent; None (= absent) if it is broken."""
    try:
        return protocol.decode_value(spec, part)
    except Exception as error:  # one broken value must not stop the file
        logger.warning("channel %s: value not decodable (%s); stored as absent", name, error)
        return None


def _new_column_class(spec: protocol.ChannelSpec) -> type[_Column]:
    """Storage for a channel, chosen by its first present value."""
    if spec.is_string:
        return _StringColumn
    nbytes = np.dtype(spec.dtype).itemsize * math.prod(spec.array_shape)
    if spec.compression == "bitshuffle_lz4" and DIRECT_CHUNK_MIN_BYTES <= nbytes <= MAX_CHUNK_BYTES:
        return _DirectChunkColumn
    return _FixedColumn


def _new_column(group: h5py.Group, spec: protocol.ChannelSpec, rows_written: int) -> _Column:
    return _new_column_class(spec)(group, spec, rows_written)  # type: ignore[call-arg]


class _HeaderPlan:
    """How the messages of one data header are taken apart (built once per header change).

    ``packed`` are the channels whose value part is stored as sent
    (uncompressed numbers of a fixed size, in a buffered column): for them a
    message costs two ``bytes.join`` calls and a length check instead of a
    Python step per channel — a 500-channel scalar stream is otherwise
    dominated by that loop. Everything else (strings, compressed values,
    direct chunks, a packed value of the wrong size) goes channel by channel.
    """

    def __init__(self, header: Any, columns: list[_Column | None]) -> None:
        self.header = header
        self.columns = columns  # column of each channel index, None until its first present value
        self.packed: list[int] = []
        self.others: list[int] = []
        for index, spec in enumerate(header.channels):
            column = columns[index]
            packable = (not spec.is_string and spec.compression == "none" and spec.nbytes
                        and (column is None or isinstance(column, _FixedColumn))
                        and (column is not None or _new_column_class(spec) is _FixedColumn))
            (self.packed if packable else self.others).append(index)
        packed_specs = [header.channels[i] for i in self.packed]
        self.expected = [spec.nbytes for spec in packed_specs]
        self.expected_stamps = [_TIMESTAMP_BYTES] * len(self.packed)
        self.zero_values = [bytes(n) for n in self.expected]
        self.offsets = np.concatenate([[0], np.cumsum(self.expected, dtype=np.int64)]).astype(np.int64)
        self.row_nbytes = int(self.offsets[-1])
        self.all_present = b"\x01" * len(self.packed)
        value_indices = [2 + 2 * i for i in self.packed]
        stamp_indices = [3 + 2 * i for i in self.packed]
        self.values_of = _getter(value_indices)
        self.stamps_of = _getter(stamp_indices)


def _getter(indices: list[int]) -> Callable[[Any], tuple]:
    """``frames -> tuple of frames[i] for i in indices`` (always a tuple)."""
    if len(indices) == 1:
        only = indices[0]
        return lambda frames: (frames[only],)
    if not indices:
        return lambda frames: ()
    return operator.itemgetter(*indices)


class H5File:
    """One output file in the SwissFEL layout, fed one message per row.

    Not thread safe: one owner (the writer's loop) calls everything. The
    HDF5 file is open from construction until :meth:`close`; a crash leaves
    the data of the last :meth:`flush` readable (see the module docstring).

    ``general`` are the REST parameters (keys ``general/created`` or
    ``created`` ...); ``extra_parameters`` anything else to keep. Both are
    stored: see :meth:`_write_general`. ``clock`` is for tests.
    """

    def __init__(self, path: str | os.PathLike, general: Mapping[str, Any] | None = None,
                 extra_parameters: Mapping[str, Any] | None = None, *,
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL, block_rows: int = DEFAULT_BLOCK_ROWS,
                 block_bytes: int = DEFAULT_BLOCK_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, not {block_rows}")
        self.path = os.fspath(path)
        self.flush_interval = float(flush_interval)
        self.block_rows = int(block_rows)
        self.block_bytes = int(block_bytes)
        self._clock = clock
        # Default (earliest) libver on purpose: no superblock "open for write"
        # flag, so a file left by SIGKILL opens without h5clear. No raw data
        # chunk cache: see CHUNK_CACHE_BYTES.
        self._file = h5py.File(self.path, "w", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=CHUNK_CACHE_SLOTS)
        self._closed = False
        self._data = self._file.create_group("data")
        self._write_general(dict(general or {}), dict(extra_parameters or {}))
        self._file.attrs["format"] = FORMAT_NAME
        self._file.attrs["format_version"] = FORMAT_VERSION
        self._file.attrs["complete"] = np.uint8(0)

        self._columns: dict[str, dict[tuple, _Column]] = {}  # name -> signature -> column
        self._plan: _HeaderPlan | None = None  # for the data header of the last message
        # The packed fast path gathers rows of one plan here and hands them to
        # the columns in one go (_scatter): rows segment_row .. + segment_rows.
        self._segment_row = 0
        self._segment_rows = 0
        self._segment_values = bytearray()
        self._segment_stamps = bytearray()
        self._segment_present = bytearray()
        self._last_spec: dict[str, protocol.ChannelSpec] = {}  # every channel ever announced
        # One entry per row appended (on disk and pending): the pulse ids of a block,
        # and what truncate() needs to put the counters back (24 bytes per row).
        self._row_pulse_ids = array("q")
        self._row_timestamps = array("d")
        self._row_absent_values = array("q")  # absent_values after the row
        self._row_bytes_written = array("q")  # bytes_written after the row
        self._pending_bytes = 0
        self._rows_written = 0  # rows on disk (in every dataset)
        self._missing: list[MissingRange] = []
        self._missing_pending: list[MissingRange] = []
        self._missing_rewrite = False  # truncate() replaced the records: /missing is rewritten
        self._attributes: dict[str, Any] = {}
        self._last_flush = clock()

        self.bytes_written = 0  # value bytes accepted (as received: compressed stays compressed)
        self.absent_values = 0  # channel values announced in a header but empty
        self.hdf5_writes = 0  # dataset writes issued by block writes (for tests/benchmarks)
        self.blocks_written = 0
        self.flushes = 0
        logger.info("opened %s", self.path)

    # -- public API ------------------------------------------------------
    @property
    def channels(self) -> list[str]:
        """Names of every channel seen in a data header, in order of first sight."""
        return list(self._last_spec)

    @property
    def rows(self) -> int:
        """Messages appended (pending included)."""
        return len(self._row_pulse_ids)

    @property
    def first_pulse_id(self) -> int | None:
        return self._row_pulse_ids[0] if self._row_pulse_ids else None

    @property
    def last_pulse_id(self) -> int | None:
        return self._row_pulse_ids[-1] if self._row_pulse_ids else None

    @property
    def first_timestamp(self) -> float | None:
        return self._row_timestamps[0] if self._row_timestamps else None

    @property
    def last_timestamp(self) -> float | None:
        return self._row_timestamps[-1] if self._row_timestamps else None

    @property
    def rows_flushed(self) -> int:
        """Rows that are on disk and would survive a SIGKILL now."""
        return self._rows_written

    @property
    def missing(self) -> list[MissingRange]:
        return list(self._missing)

    @property
    def closed(self) -> bool:
        return self._closed

    def append(self, message: protocol.Message) -> None:
        """Add one row: every channel gets a value or an absent marker.

        Touches no HDF5 unless a block is full or the flush interval has
        passed, in which case it writes and flushes (see :meth:`flush`).
        """
        self._check_open()
        header = message.data_header
        plan = self._plan
        if plan is None or (header is not plan.header and header.hash != plan.header.hash):
            plan = self._use_header(header)
        row = len(self._row_pulse_ids) - self._rows_written
        self._row_pulse_ids.append(message.pulse_id)
        accepted_total = 0
        slow = plan.others
        if plan.packed:
            accepted = self._append_packed(plan, message.frames, row)
            if accepted is None:  # a packed value of the wrong size: channel by channel
                self._scatter()
                slow = range(len(header.channels))
            else:
                accepted_total = accepted
        columns = plan.columns
        channels = header.channels
        for index in slow:
            part = message.value_part(index)
            if not len(part):
                self.absent_values += 1
                continue
            spec = channels[index]
            column = columns[index]
            if column is None:
                column = columns[index] = self._column_for(spec)
            accepted_total += column.append(spec, part, message.timestamp_part(index), row)
        self._pending_bytes += accepted_total
        self.bytes_written += accepted_total
        self._row_timestamps.append(message.timestamp)
        self._row_absent_values.append(self.absent_values)
        self._row_bytes_written.append(self.bytes_written)
        if (row + 1 >= self.block_rows or self._pending_bytes >= self.block_bytes
                or self._clock() - self._last_flush >= self.flush_interval):
            self.flush()

    def record_missing(self, first_pulse_id: int, last_pulse_id: int, reason: str,
                       count: int | None = None) -> None:
        """Note pulses that will not be in the file (written at the next flush).

        ``count`` defaults to ``last - first + 1``; give it when the pulse
        step is not 1 or when it is known from the source.
        """
        self._check_open()
        first, last = int(first_pulse_id), int(last_pulse_id)
        if last < first:
            raise ValueError(f"last_pulse_id {last} < first_pulse_id {first}")
        record = MissingRange(first, last, int(count) if count is not None else last - first + 1, str(reason))
        self._missing.append(record)
        self._missing_pending.append(record)

    @property
    def missing_pulses(self) -> int:
        return sum(record.count for record in self._missing)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        """File attributes (e.g. the requested range) written at the next flush and at close.

        ``None`` values are skipped (an unset stop pulse is simply absent);
        lists and dicts are stored as JSON text.
        """
        self._check_open()
        unknown = sorted(set(attributes) - set(CALLER_ATTRIBUTES))
        if unknown:
            raise ValueError(f"not a documented file attribute: {', '.join(unknown)} "
                             f"(docs/file-format.md; settable: {', '.join(CALLER_ATTRIBUTES)})")
        self._attributes.update(attributes)

    def flush_due(self) -> bool:
        """True when data waits and the flush interval has passed (for idle loops)."""
        return (not self._closed and (self.rows > self._rows_written or bool(self._missing_pending))
                and self._clock() - self._last_flush >= self.flush_interval)

    def maybe_flush(self) -> bool:
        """Flush if :meth:`flush_due`; the writer calls this when the source is quiet."""
        if self.flush_due():
            self.flush()
            return True
        return False

    def truncate(self, rows: int, missing: Iterable[MissingRange] | None = None) -> int:
        """Keep only the first ``rows`` rows; return how many were removed.

        For a stop that comes after its pulse was written (normal for a past
        range: the replay runs ahead before the DAQ sends the stop). Rows not
        flushed yet are dropped from memory; rows on disk are cut by shrinking
        every dataset under /data (all share axis 0). ``rows``,
        ``first_/last_pulse_id``, ``first_/last_timestamp``, ``absent_values``
        and ``bytes_written`` then describe the rows kept, and the attribute
        ``rows_removed_after_stop`` adds up the rows removed. ``missing``
        replaces the records of /missing (the caller clips them to its stop:
        the file does not know the pulse step); None keeps them. Groups
        created by removed rows stay, all absent. Ends with a :meth:`flush`:
        on return the file on disk is the cut one.
        """
        self._check_open()
        if not 0 <= rows <= self.rows:
            raise ValueError(f"cannot truncate {self.rows} rows to {rows}")
        removed = self.rows - rows
        self._scatter()  # every pending row into its column
        columns = list(self._each_column())
        for column in columns:
            column.drop_pending(max(0, rows - self._rows_written))
        if rows < self._rows_written:
            # The row count first: a reader (or a kill) never sees rows counted that are gone.
            self._file.attrs["number_of_messages"] = np.int64(rows)
            for column in columns:
                column.resize(rows)
            self._rows_written = rows
        for log in (self._row_pulse_ids, self._row_timestamps, self._row_absent_values, self._row_bytes_written):
            del log[rows:]
        self.absent_values = self._row_absent_values[-1] if rows else 0
        self.bytes_written = self._row_bytes_written[-1] if rows else 0
        self._pending_bytes = 0  # the rows kept are written by the flush below
        if missing is not None:
            self._missing = list(missing)
            self._missing_pending = list(self._missing)
            self._missing_rewrite = True
        if removed:
            self._attributes["rows_removed_after_stop"] = self._attributes.get("rows_removed_after_stop", 0) + removed
            logger.info("%s: %d rows removed after the stop, %d kept", self.path, removed, rows)
        self.flush()
        return removed

    def flush(self) -> None:
        """Write pending rows and missing records, update attributes, ``H5Fflush``.

        After it returns, everything appended so far survives a SIGKILL.
        """
        self._check_open()
        self._write_block()
        self._write_missing()
        self._write_file_attributes(complete=False)
        self._file.flush()
        self._last_flush = self._clock()
        self.flushes += 1

    def close(self, attributes: Mapping[str, Any] | None = None) -> None:
        """Write everything, mark the file complete and close it. Idempotent.

        Channels announced but never present get all-absent datasets with
        their last announced type. The HDF5 file is closed even when writing
        fails (the error is then raised).
        """
        if self._closed:
            return
        try:
            if attributes:
                self.set_attributes(attributes)
            self._write_block()
            for name, spec in self._last_spec.items():
                if name not in self._columns:
                    self._column_for(spec)  # created with _rows_written rows, all absent
            self._write_missing()
            self._write_file_attributes(complete=True)
        finally:
            self._closed = True
            self._file.close()
        logger.info("closed %s: %d rows, %d channels, %d missing pulses",
                    self.path, self.rows, len(self._last_spec), self.missing_pulses)

    def __enter__(self) -> "H5File":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path} is closed")

    def _use_header(self, header: Any) -> _HeaderPlan:
        """A new data header: map each channel index to its column (if any yet)."""
        self._scatter()  # pending packed rows belong to the previous plan
        columns: list[_Column | None] = []
        for spec in header.channels:
            self._last_spec[spec.name] = spec
            variants = self._columns.get(spec.name)
            columns.append(variants.get(_signature(spec)) if variants else None)
        self._plan = _HeaderPlan(header, columns)
        return self._plan

    def _append_packed(self, plan: _HeaderPlan, frames: Any, row: int) -> int | None:
        """Gather the packed channels' parts of one message; None if one has the wrong size."""
        values = plan.values_of(frames)
        stamps = plan.stamps_of(frames)
        lengths = list(map(len, values))
        accepted = sum(lengths)
        present: bytes | bytearray = plan.all_present
        if lengths != plan.expected:
            values, stamps, present = list(values), list(stamps), bytearray(present)
            absent = 0
            for j, (length, expected) in enumerate(zip(lengths, plan.expected)):
                if length == expected:
                    continue
                if length:
                    return None
                values[j] = plan.zero_values[j]
                stamps[j] = _ABSENT_TIMESTAMP
                present[j] = 0
                absent += 1
            self.absent_values += absent
        if list(map(len, stamps)) != plan.expected_stamps:
            stamps = [stamp if len(stamp) == _TIMESTAMP_BYTES else _ABSENT_TIMESTAMP for stamp in stamps]
        if self._segment_rows and self._segment_row + self._segment_rows != row:
            self._scatter()
        if not self._segment_rows:
            self._segment_row = row
        self._segment_values += b"".join(values)
        self._segment_stamps += b"".join(stamps)
        self._segment_present += present
        self._segment_rows += 1
        return accepted

    def _scatter(self) -> None:
        """Hand the gathered packed rows to their columns (creating a column at its first value)."""
        count = self._segment_rows
        if not count:
            return
        plan = self._plan
        assert plan is not None
        packed = plan.packed
        values = np.frombuffer(self._segment_values, dtype="u1").reshape(count, plan.row_nbytes)
        stamps = np.frombuffer(self._segment_stamps, dtype="u1").reshape(count, _TIMESTAMP_BYTES * len(packed))
        present = np.frombuffer(self._segment_present, dtype="u1").reshape(count, len(packed))
        all_present = bool(present.all())
        offsets = plan.offsets
        channels = plan.header.channels
        for j, index in enumerate(packed):
            column_present = present[:, j]
            if not all_present and not column_present.any():
                continue  # absent throughout: padding does it, and no column before a first value
            column = plan.columns[index]
            if column is None:
                column = plan.columns[index] = self._column_for(channels[index])
            column.append_batch(channels[index], self._segment_row, values[:, offsets[j]:offsets[j + 1]],
                                stamps[:, _TIMESTAMP_BYTES * j:_TIMESTAMP_BYTES * (j + 1)],
                                np.ascontiguousarray(column_present))
        self._segment_rows = 0
        self._segment_values = bytearray()
        self._segment_stamps = bytearray()
        self._segment_present = bytearray()

    def _column_for(self, spec: protocol.ChannelSpec) -> _Column:
        """The column for this channel's (type, shape), creating it (and its group) if new."""
        variants = self._columns.setdefault(spec.name, {})
        signature = _signature(spec)
        column = variants.get(signature)
        if column is not None:
            return column
        if not variants:
            group_name = spec.name
        else:
            number = len(variants) + 1
            while f"{spec.name}{VARIANT_SEPARATOR}{number}" in self._data:
                number += 1
            group_name = f"{spec.name}{VARIANT_SEPARATOR}{number}"
        group = self._data.create_group(group_name)
        # Rows already on disk read as absent (fill value 0); pending rows of
        # this block before the first value are padded as absent by append.
        column = _new_column(group, spec, self._rows_written)
        variants[signature] = column
        if len(variants) > 1:
            group.attrs["channel"] = spec.name
            group.attrs["variant"] = len(variants)
            first = self._data[spec.name]
            first.attrs["variants"] = np.array(
                [spec.name] + [c.group.name.rsplit("/", 1)[1] for c in list(variants.values())[1:]],
                dtype=_STRING_DTYPE)
            logger.warning("channel %s changed to %s %s: values go to /data/%s",
                           spec.name, signature[0], list(signature[1]), group_name)
        return column

    def _each_column(self) -> Iterable[_Column]:
        for variants in self._columns.values():
            yield from variants.values()

    def _write_block(self) -> None:
        """Write the pending rows of every column: one resize and slice write per dataset."""
        self._scatter()
        start = self._rows_written
        count = self.rows - start
        if not count:
            return
        pulse_ids = np.frombuffer(self._row_pulse_ids[start:], dtype="i8")  # a copy: the log keeps growing
        writes = 0
        for column in self._each_column():
            writes += column.write_block(start, count, pulse_ids)
        self._rows_written = start + count
        self._pending_bytes = 0
        self.hdf5_writes += writes
        self.blocks_written += 1

    def _write_missing(self) -> None:
        if self._missing_rewrite:
            self._missing_rewrite = False
            if "missing" in self._file:
                del self._file["missing"]  # absent when nothing is missing, as always
        if not self._missing_pending:
            return
        if "missing" not in self._file:
            table = self._file.create_dataset("missing", shape=(0,), maxshape=(None,),
                                              dtype=_MISSING_DTYPE, chunks=(256,))
            table.attrs["description"] = ("pulses not in the file: first_pulse_id..last_pulse_id "
                                          "(inclusive), count pulses, and why")
        table = self._file["missing"]
        start = table.shape[0]
        rows = np.array([(r.first_pulse_id, r.last_pulse_id, r.count, r.reason)
                         for r in self._missing_pending], dtype=_MISSING_DTYPE)
        table.resize(start + len(rows), axis=0)
        table[start:] = rows
        self._missing_pending = []

    def _write_file_attributes(self, complete: bool) -> None:
        attrs = self._file.attrs
        for key, value in self._attributes.items():
            if value is None:
                if key in attrs:
                    del attrs[key]
                continue
            attrs[key] = _attribute_value(value)
        # Counts describe what is on disk, so that they hold after a crash too.
        attrs["number_of_messages"] = np.int64(self._rows_written)
        attrs["missing_pulses"] = np.int64(sum(r.count for r in self._missing))
        attrs["absent_values"] = np.int64(self.absent_values)
        if self._rows_written:
            attrs["first_pulse_id"] = np.int64(self.first_pulse_id)
            attrs["last_pulse_id"] = np.int64(self.last_pulse_id)
            attrs["first_timestamp"] = float(self.first_timestamp)
            attrs["last_timestamp"] = float(self.last_timestamp)
        else:  # none yet, or truncate() removed them all
            for key in ("first_pulse_id", "last_pulse_id", "first_timestamp", "last_timestamp"):
                attrs.pop(key, None)
        attrs["complete"] = np.uint8(complete)

    def _write_general(self, general: dict[str, Any], extra: dict[str, Any]) -> None:
        """/general: the four original datasets plus every other parameter.

        The four fields are scalar fixed-length byte strings as in the
        original ("not given" when unset). Every other parameter becomes a
        scalar dataset ``/general/<key>`` (key without a leading
        ``general/``, remaining ``/`` replaced by ``.``): strings as
        fixed-length bytes, numbers as numbers, anything else as JSON text.
        The full parameter dict as received is also kept, losslessly, as
        JSON in the attribute ``/general.attrs["parameters"]``.
        """
        group = self._file.create_group("general")
        parameters = {**general, **extra}
        plain: dict[str, Any] = {}
        for key, value in parameters.items():
            name = str(key)
            if name.startswith("general/"):
                name = name[len("general/"):]
            name = name.replace("/", ".") or "_"
            if name in plain:
                logger.warning("parameter %r collides with another after normalisation; "
                               "kept in /general attribute 'parameters' only", key)
                continue
            plain[name] = value
        for name in GENERAL_FIELDS:
            value = plain.pop(name, None)
            text = NOT_GIVEN if value is None else (value if isinstance(value, str) else str(value))
            group.create_dataset(name, data=_fixed_string(text))
        for name, value in plain.items():
            try:
                if isinstance(value, str):
                    data: Any = _fixed_string(value)
                elif isinstance(value, bool):
                    data = np.uint8(value)
                elif isinstance(value, (int, float)) and not (isinstance(value, int) and abs(value) >= 2**63):
                    data = value
                else:
                    data = _fixed_string(json.dumps(value, default=str))
                group.create_dataset(name, data=data)
            except (ValueError, TypeError) as error:
                logger.warning("parameter %r not stored as a dataset (%s); kept in the "
                               "'parameters' attribute", name, error)
        group.attrs["parameters"] = json.dumps(parameters, default=str, sort_keys=True)


def _fixed_string(text: str) -> np.bytes_ | np.ndarray:
    """A fixed-length byte string scalar (the original's /general type); never S0."""
    encoded = text.encode("utf-8")
    if not encoded:
        return np.array(b"", dtype="S1")
    return np.bytes_(encoded)
