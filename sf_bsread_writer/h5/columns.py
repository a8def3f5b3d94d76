"""Column storage: one channel's datasets and the rows waiting to be written into them.

A :class:`Column` is one channel group (``/data/<channel>`` or a variant for
a changed type) with its four datasets, and the pending rows of the current
block in memory. The kind of column is chosen by the channel's first
present value (:func:`column_class_for`):

* :class:`FixedColumn`: numbers and bools, raw bytes gathered in one
  bytearray (the packed fast path hands it whole blocks: ``append_batch``);
* :class:`StringColumn`: vlen UTF-8;
* :class:`DirectChunkColumn`: ``bitshuffle_lz4`` arrays, each value part
  stored as one HDF5 chunk with ``write_direct_chunk`` (never decompressed).

Nothing here touches HDF5 except at creation and in ``write_block``: the
file (``h5.file.H5File``) decides when.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import struct
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from sf_bsread_writer.bsread.codecs import (
    decode_timestamp,
    decode_value,
    direct_chunk_compatible,
)
from sf_bsread_writer.bsread.spec import ChannelSpec
from sf_bsread_writer.bsread.timebase import stamps_to_ns
from sf_bsread_writer.h5.calls import CALLS, Dataset
from sf_bsread_writer.h5.layout import (
    ABSENT_TIMESTAMP,
    DIRECT_CHUNK_MIN_BYTES,
    MAX_CHUNK_BYTES,
    MAX_CHUNK_ROWS,
    STRING_DTYPE,
    TIMESTAMP_BYTES,
    attribute_value,
    channel_signature,
    chunk_shape,
    storable,
    storable_text,
)

__all__ = ["Column", "ColumnMaker", "CopiedGroup", "FixedColumn", "StringColumn", "DirectChunkColumn",
           "column_class_for", "write_rows"]

logger = logging.getLogger(__name__)

# A block of a FixedColumn with absent rows is written as one array with zeros
# in the absent rows when it is at most this large; above, run by run.
DENSE_BLOCK_BYTES = 4 * 1024 * 1024

# File space of HDF5's chunk index (earliest format: a version 1 B-tree per
# dataset, nodes of up to 64 entries, ~2.6 KiB for a scalar or an image
# dataset): per new chunk, the first chunk's root node, and a node more for
# every INDEX_NODE_ENTRIES new chunks (splits). Measured against the file's
# growth per block: docs/file-format.md, "A full disk".
CHUNK_INDEX_BYTES = 64
INDEX_NODE_BYTES = 4096
INDEX_NODE_ENTRIES = 32
# HDF5's global heap (vlen strings): each string plus its object header, and a new collection (>= 4 KiB).
HEAP_OBJECT_BYTES = 24
HEAP_COLLECTION_BYTES = 4096
# What a block write rewrites in place (the undo journal's share, h5/file.py): an object header (<= 1 KiB here),
# a global heap collection strings were added to (HDF5 fills one up to 64 KiB before it starts another).
OBJECT_HEADER_BYTES = 1024
HEAP_REWRITTEN_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class CopiedGroup:
    """A channel group just copied from its template (:class:`ColumnMaker`): where it is, and its four
    datasets open (h5py ids or bare ones: ``h5.calls.Dataset``). The group itself is not opened: an
    h5py object for it is made only if something asks (``Column.group``)."""

    parent: h5py.Group
    name: str
    data: Dataset
    pulse_id: Dataset
    is_data_present: Dataset
    timestamp: Dataset


class Column:
    """One channel group (``/data/<channel>`` or a variant) and its pending rows.

    Rows are block-relative while pending: ``filled`` rows of the current
    block are accounted for; absent rows are added lazily (``_pad``) when a
    later value or the block write needs them, so an absent channel costs
    nothing per message.
    """

    kind = "buffered"

    def __init__(self, group: h5py.Group | CopiedGroup, spec: ChannelSpec, rows_written: int,
                 dtype: np.dtype, row_shape: tuple[int, ...]) -> None:
        self.name = spec.name
        self.signature = channel_signature(spec)
        self.dtype = dtype
        self.row_shape = row_shape
        self.row_nbytes = dtype.itemsize * math.prod(row_shape) if row_shape else dtype.itemsize
        self.ts_order = ">" if spec.encoding == "big" else "<"
        self.filled = 0
        self.present = bytearray()
        self.timestamps = bytearray()
        self.expanded = 0  # bytes held beyond the bytes received (decoded values): see take_expansion
        # The datasets are written block-wise through their low-level ids (``h5.calls.Dataset``): an
        # h5py object around each costs ~50 us per channel for nothing; ``data`` and ``group`` make one
        # when something needs h5py's API.
        self._data: h5py.Dataset | None = None
        if isinstance(group, CopiedGroup):  # a copy of a template group: the datasets and attributes are there
            self._group: h5py.Group | None = None
            self._copied: CopiedGroup | None = group
            self.data_id: Dataset = group.data
            self.pulse_id, self.is_data_present, self.timestamp = group.pulse_id, group.is_data_present, group.timestamp
            if rows_written:
                self.resize(rows_written)
            return
        self._group, self._copied = group, None
        self._data = self._create_data(group, spec, rows_written)
        self.data_id = self._data.id
        self.pulse_id = row_dataset(group, "pulse_id", rows_written, np.dtype("<i8")).id
        self.is_data_present = row_dataset(group, "is_data_present", rows_written, np.dtype("u1")).id
        timestamp = row_dataset(group, "timestamp", rows_written, np.dtype("<i8"))
        new_attributes(timestamp, {"units": "ns since 1970-01-01T00:00:00Z (bsread channel timestamp)"})
        self.timestamp = timestamp.id
        new_attributes(group, {**channel_attributes(spec), "storage": self.kind})

    @property
    def group(self) -> h5py.Group:
        """The channel's group (h5py), opened at the first ask for a copied one."""
        if self._group is None:
            assert self._copied is not None
            self._group = self._copied.parent[self._copied.name]
        return self._group

    @property
    def data(self) -> h5py.Dataset:
        """The ``data`` dataset (h5py), made at the first ask for a copied one."""
        if self._data is None:
            self._data = h5py.Dataset(CALLS.h5py_id(self.data_id))
        return self._data

    # -- subclass hooks ---------------------------------------------------
    def _create_data(self, group: h5py.Group, spec: ChannelSpec, rows: int) -> h5py.Dataset:
        raise NotImplementedError

    def _append_value(self, spec: ChannelSpec, part: Any, row: int) -> int:
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

    def _values_space(self, start: int, rows: int) -> int:
        """At most the file space that writing the first ``rows`` pending values at file row ``start`` takes."""
        raise NotImplementedError

    def space_needed(self, start: int, rows: int) -> int:
        """At most the file space (bytes) that :meth:`write_block` of the first ``rows`` pending rows takes.

        For the writer's full-disk check (``H5File.flush``): HDF5 allocates a
        chunk whole when a write first touches it, and indexes it; rows
        beyond the pending ones read as absent. An upper bound, never exact.
        """
        if rows <= 0:
            return 0
        # pulse_id, timestamp (8 B a row) and is_data_present (1 B): chunks of MAX_CHUNK_ROWS rows.
        row_chunks = _new_chunks(start, rows, MAX_CHUNK_ROWS)
        return (2 * _chunk_space(row_chunks, MAX_CHUNK_ROWS * 8, start == 0)
                + _chunk_space(row_chunks, MAX_CHUNK_ROWS, start == 0) + self._values_space(start, rows))

    def rewritten_bytes(self, start: int, rows: int) -> int:
        """At most the bytes already in the file that a block of ``rows`` rows from file row ``start`` rewrites in place.

        For the undo journal's room (h5/file.py): the four object headers;
        the chunk index nodes, only when the block adds a chunk (a block that
        stays inside the last chunk changes no index: measured, 100-row
        blocks of float64 scalars journal 3.4 KiB per channel, 10-11 KiB when
        they start a chunk); the rows the block writes into the row datasets'
        last chunk (HDF5 writes an uncompressed selection where it lies, not
        its whole chunk: the same measurement); and the data dataset's share
        (``_values_rewritten``: its whole shared chunk, a filtered chunk is
        rewritten whole).
        """
        if rows <= 0:
            return 0
        adds_chunk = start % MAX_CHUNK_ROWS == 0 or (start + rows - 1) // MAX_CHUNK_ROWS != start // MAX_CHUNK_ROWS
        shared_rows = 0 if start % MAX_CHUNK_ROWS == 0 else min(rows, MAX_CHUNK_ROWS - start % MAX_CHUNK_ROWS)
        return (4 * OBJECT_HEADER_BYTES + (4 * 2 * INDEX_NODE_BYTES if adds_chunk or self._adds_data_chunk(start, rows)
                                           else 0)
                + shared_rows * (8 + 8 + 1) + self._values_rewritten(start))

    def _adds_data_chunk(self, start: int, rows: int) -> bool:
        """Whether the block adds a chunk to the data dataset (its chunks may hold fewer rows than the others')."""
        return False

    def _values_rewritten(self, start: int) -> int:
        """The data dataset's share of :meth:`rewritten_bytes` (its chunk shared with written rows)."""
        return 0

    def take_expansion(self) -> int:
        """Memory taken since the last call beyond the received bytes (a decompressed value is bigger).

        The file adds it to its pending bytes, so that ``block_bytes`` bounds
        what waits in memory also when values are decoded (``--decompress-images``).
        """
        expanded, self.expanded = self.expanded, 0
        return expanded

    # -- shared row bookkeeping ------------------------------------------
    def resize(self, rows: int) -> None:
        """Grow or shrink every dataset of the group to ``rows`` rows (they all share axis 0)."""
        # data's rows are row_shape (strings: ()), as made: h5py's .shape costs ~10 us per call.
        set_extent = CALLS.set_extent  # through ctypes where it can: h5.calls
        set_extent(self.data_id, (rows, *self.row_shape))
        for dataset_id in (self.pulse_id, self.is_data_present, self.timestamp):
            set_extent(dataset_id, (rows,))

    def drop_pending(self, keep: int) -> None:
        """Forget the pending rows from block row ``keep`` on (``H5File.truncate``)."""
        if self.filled > keep:
            del self.present[keep:]
            del self.timestamps[keep * TIMESTAMP_BYTES:]
            self._drop_values(keep)
            self.filled = keep

    def _pad(self, upto: int) -> None:
        count = upto - self.filled
        if count > 0:
            self._pad_values(count)
            self.present += bytes(count)
            self.timestamps += ABSENT_TIMESTAMP * count
            self.filled = upto

    def append(self, spec: ChannelSpec, value_part: Any, timestamp_part: Any, row: int) -> int:
        """Store the present value of ``row`` (block-relative); return its byte count."""
        self._pad(row)
        accepted = self._append_value(spec, value_part, row)
        if not accepted:
            self._pad(row + 1)
            return 0
        self.present.append(1)
        if len(timestamp_part) == TIMESTAMP_BYTES and (">" if spec.encoding == "big" else "<") == self.ts_order:
            self.timestamps += timestamp_part
        else:
            decoded = None
            try:
                decoded = decode_timestamp(spec, timestamp_part)
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
        end = start + count
        if 0 in self.present:
            present = np.frombuffer(self.present, dtype="u1")
            write_rows(self.is_data_present, start, present, end)
            write_rows(self.pulse_id, start, np.where(present != 0, pulse_ids, 0).astype("<i8"), end)
        else:  # present throughout (the usual block): the block's own arrays, no numpy per channel
            write_rows(self.is_data_present, start, _all_present(count), end)
            write_rows(self.pulse_id, start, pulse_ids, end)
        stamps = np.frombuffer(self.timestamps, dtype=self.ts_order + "i8").reshape(count, 2)
        # A stamp that is no time (2^62 s wrapped to 0, negative ns ...) is stored as 0, "not given".
        write_rows(self.timestamp, start, stamps_to_ns(stamps[:, 0], stamps[:, 1]), end)
        writes = 3 + self._write_values(start, count)
        self.present = bytearray()
        self.timestamps = bytearray()
        self.filled = 0
        return writes


class FixedColumn(Column):
    """Numeric and bool arrays/scalars: the raw bytes of the present values gathered in one bytearray.

    Only present values are held: an absent row costs its ``present`` flag,
    never a row of zeros (a channel declaring 100 MB per value and always
    absent costs nothing; HDF5's fill value 0 is what absent rows read as).
    A block whose rows are all present is one write; otherwise the block is
    expanded with zeros when it is small, or written run by run of present
    rows when it is large.
    """

    kind = "buffered"

    def __init__(self, group: h5py.Group | CopiedGroup, spec: ChannelSpec, rows_written: int) -> None:
        self.values = bytearray()  # present rows only, in row order
        # Native byte order, as the original and psi-bsread's writer stored it: a big-endian
        # channel's values are swapped once per block (append_batch) or per value, not by every reader.
        super().__init__(group, spec, rows_written, np.dtype(spec.dtype).newbyteorder("="),
                         tuple(spec.array_shape))

    def _create_data(self, group: h5py.Group, spec: ChannelSpec, rows: int) -> h5py.Dataset:
        return row_dataset(group, "data", rows, self.dtype, self.row_shape,
                           chunk_shape(self.row_shape, self.dtype.itemsize))

    def _append_value(self, spec: ChannelSpec, part: Any, row: int) -> int:
        # Fast path: uncompressed, right size, same dtype -> the bytes as sent.
        if spec.compression == "none" and len(part) == self.row_nbytes:
            if spec.dtype == self.dtype:
                self.values += part
            else:  # the other byte order: swapped into the native one
                self.values += np.frombuffer(part, dtype=spec.dtype).astype(self.dtype).tobytes()
            return len(part)
        value = decode_or_absent(spec, part, self.name)
        if value is None:
            return 0
        decoded = np.ascontiguousarray(value, dtype=self.dtype).tobytes()
        self.values += decoded
        self.expanded += max(0, len(decoded) - len(part))
        return len(part)

    def _pad_values(self, count: int) -> None:
        pass  # absent rows hold nothing: see the class docstring

    def _drop_values(self, keep: int) -> None:
        # Called once ``present`` is cut to ``keep`` rows: keep the values of its present rows.
        del self.values[self.present.count(1) * self.row_nbytes:]

    @functools.cached_property
    def _chunk_geometry(self) -> tuple[int, int, int]:
        """(rows per chunk, chunks per row slab, bytes per chunk) of ``data``, as made (``_create_data``)."""
        chunks = chunk_shape(self.row_shape, self.dtype.itemsize)
        per_slab = math.prod(-(-size // chunk) for size, chunk in zip(self.row_shape, chunks[1:]))
        return chunks[0], per_slab, math.prod(chunks) * self.dtype.itemsize

    def _values_space(self, start: int, rows: int) -> int:
        if not self.present[:rows].count(1):
            return 0  # absent throughout: nothing written, the fill value
        chunk_rows, per_slab, chunk_bytes = self._chunk_geometry
        return _chunk_space(_new_chunks(start, rows, chunk_rows) * per_slab, chunk_bytes, start == 0)

    def _values_rewritten(self, start: int) -> int:
        chunk_rows, per_slab, chunk_bytes = self._chunk_geometry
        return chunk_bytes * per_slab if start % chunk_rows else 0

    def _adds_data_chunk(self, start: int, rows: int) -> bool:
        chunk_rows = self._chunk_geometry[0]
        return start % chunk_rows == 0 or (start + rows - 1) // chunk_rows != start // chunk_rows

    def append_batch(self, spec: ChannelSpec, row: int, values: np.ndarray, stamps: np.ndarray,
                     present: np.ndarray) -> None:
        """Rows ``row..row+n`` at once from the packed fast path (absent rows hold zeros there, not here)."""
        self._pad(row)
        if not present.all():
            values = values[present.astype(bool)]
        if spec.dtype != self.dtype:  # same type, other byte order
            values = np.ascontiguousarray(values).view(spec.dtype).astype(self.dtype).view("u1")
        # memoryview, not tobytes(): the strided slices are copied once (into contiguous arrays), not twice.
        self.values += memoryview(np.ascontiguousarray(values))
        self.present += memoryview(present)
        spec_order = ">" if spec.encoding == "big" else "<"
        stamps = np.ascontiguousarray(stamps)
        if spec_order != self.ts_order:
            stamps = np.ascontiguousarray(stamps.view(spec_order + "i8").astype(self.ts_order + "i8").view("u1"))
        self.timestamps += memoryview(stamps)
        self.filled = row + len(present)

    def _write_values(self, start: int, count: int) -> int:
        values = np.frombuffer(self.values, dtype=self.dtype).reshape((-1, *self.row_shape))
        self.values = bytearray()
        n_present = len(values)
        if n_present == count:
            write_rows(self.data_id, start, values, start + count)
            return 1
        if not n_present:
            return 0  # absent throughout: the fill value
        present = np.frombuffer(self.present, dtype="u1").astype(bool)
        if count * self.row_nbytes <= DENSE_BLOCK_BYTES:
            block = np.zeros((count, *self.row_shape), dtype=self.dtype)
            block[present] = values
            write_rows(self.data_id, start, block, start + count)
            return 1
        # Large rows: one write per run of consecutive present rows.
        rows = np.flatnonzero(present)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        writes = 0
        for run, offset in zip(np.split(rows, breaks), np.concatenate([[0], breaks])):
            write_rows(self.data_id, start + int(run[0]), values[offset:offset + len(run)], start + count)
            writes += 1
        return writes


class StringColumn(Column):
    """Strings: vlen UTF-8, absent rows are ``""``."""

    kind = "buffered"

    def __init__(self, group: h5py.Group | CopiedGroup, spec: ChannelSpec, rows_written: int) -> None:
        self.values: list[str] = []
        super().__init__(group, spec, rows_written, np.dtype("u1"), ())

    def _create_data(self, group: h5py.Group, spec: ChannelSpec, rows: int) -> h5py.Dataset:
        return group.create_dataset("data", shape=(rows,), maxshape=(None,), dtype=STRING_DTYPE,
                                    chunks=(MAX_CHUNK_ROWS,))

    def _append_value(self, spec: ChannelSpec, part: Any, row: int) -> int:
        if spec.is_string and spec.compression == "none":
            try:
                text = bytes(part).decode("utf-8")
            except UnicodeDecodeError:
                text = bytes(part).decode("utf-8", errors="replace")
                logger.warning("channel %s: string value is not UTF-8; stored with replacements", self.name)
        else:
            value = decode_or_absent(spec, part, self.name)
            if value is None:
                return 0
            text = value if isinstance(value, str) else str(value)
        self.values.append(text)
        return len(part)

    def _pad_values(self, count: int) -> None:
        self.values.extend([""] * count)

    def _drop_values(self, keep: int) -> None:
        del self.values[keep:]

    def _values_space(self, start: int, rows: int) -> int:
        # The chunks of references (16 B a row), and each string in the global heap.
        texts = sum(len(text.encode("utf-8", "surrogatepass")) + HEAP_OBJECT_BYTES for text in self.values[:rows])
        return (_chunk_space(_new_chunks(start, rows, MAX_CHUNK_ROWS), MAX_CHUNK_ROWS * 16, start == 0)
                + texts + HEAP_COLLECTION_BYTES)

    def _values_rewritten(self, start: int) -> int:
        # The chunk of references shared with written rows, and the global heap collection strings are added to.
        return (MAX_CHUNK_ROWS * 16 if start % MAX_CHUNK_ROWS else 0) + HEAP_REWRITTEN_BYTES

    def _write_values(self, start: int, count: int) -> int:
        self.data[start:start + count] = np.array(self.values, dtype=object)
        self.values = []
        return 1


class DirectChunkColumn(Column):
    """bitshuffle_lz4 arrays: one chunk per row, value parts stored as chunks."""

    kind = "bitshuffle_lz4 direct chunk"

    def __init__(self, group: h5py.Group | CopiedGroup, spec: ChannelSpec, rows_written: int) -> None:
        self.chunks: list[tuple[int, Any]] = []  # (block row, compressed bytes as received)
        self.decoded: list[tuple[int, np.ndarray]] = []  # fallback: written through the filter
        self.direct_chunks = 0
        self.filtered_rows = 0
        super().__init__(group, spec, rows_written, np.dtype(spec.dtype), tuple(spec.array_shape))

    def _create_data(self, group: h5py.Group, spec: ChannelSpec, rows: int) -> h5py.Dataset:
        return group.create_dataset(
            "data", shape=(rows, *self.row_shape), maxshape=(None, *self.row_shape),
            dtype=self.dtype, chunks=chunk_shape(self.row_shape, self.dtype.itemsize, one_row=True),
            fillvalue=np.zeros((), self.dtype), **hdf5plugin.Bitshuffle(cname="lz4"))

    def _append_value(self, spec: ChannelSpec, part: Any, row: int) -> int:
        if (spec.compression == "bitshuffle_lz4" and spec.dtype == self.dtype
                and direct_chunk_compatible(spec, part)):
            self.chunks.append((row, part))
        else:
            value = decode_or_absent(spec, part, self.name)
            if value is None:
                return 0
            self.decoded.append((row, np.ascontiguousarray(value, dtype=self.dtype)))
        return len(part)

    def _pad_values(self, count: int) -> None:
        pass  # unwritten chunks read as the fill value 0

    def _drop_values(self, keep: int) -> None:
        self.chunks = [(row, part) for row, part in self.chunks if row < keep]
        self.decoded = [(row, value) for row, value in self.decoded if row < keep]

    def _values_space(self, start: int, rows: int) -> int:
        # One chunk per row: the part as received, or a decoded value compressed again (LZ4 may grow it a little).
        stored = sum(len(part) for row, part in self.chunks if row < rows)
        chunks = sum(1 for row, _ in self.chunks if row < rows)
        for row, _ in self.decoded:
            if row < rows:
                stored += self.row_nbytes + self.row_nbytes // 128 + 4096
                chunks += 1
        return stored + _chunk_space(chunks, 0, start == 0)

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


# Creation property lists and types of the row datasets, by (dtype, row shape, chunks): the first
# dataset of a kind is made by h5py's high-level API, the rest copy its plist with the low-level
# one. A 500-channel stream creates 2000 datasets in a fresh writer: at ~120 us each through the
# high-level API (plus ~55 us per attribute) that was most of a short acquisition's time
# (docs/performance.md). The plists belong to the library, not to a file: safe to share.
_ROW_DATASET_TEMPLATES: dict[tuple, tuple[Any, Any]] = {}


def row_dataset(group: h5py.Group, name: str, rows: int, dtype: np.dtype, row_shape: tuple[int, ...] = (),
                chunks: tuple[int, ...] | None = None) -> h5py.Dataset:
    """A new dataset ``group[name]``: ``rows`` rows of ``row_shape``, unlimited along rows, chunked, fill 0."""
    chunks = chunks or (MAX_CHUNK_ROWS, *row_shape)
    key = (dtype.str, row_shape, chunks)
    template = _ROW_DATASET_TEMPLATES.get(key)
    if template is None:
        dataset = group.create_dataset(name, shape=(rows, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
                                       chunks=chunks, fillvalue=np.zeros((), dtype))
        plist = dataset.id.get_create_plist()
        plist.set_obj_track_times(False)  # as h5py's default; the plist read back says 1 (HDF5's default)
        _ROW_DATASET_TEMPLATES[key] = (plist, dataset.id.get_type())
        return dataset
    plist, type_id = template
    space = h5py.h5s.create_simple((rows, *row_shape), (h5py.h5s.UNLIMITED, *row_shape))
    return h5py.Dataset(h5py.h5d.create(group.id, name.encode(), type_id, space, dcpl=plist))


_STRING_TYPE = h5py.h5t.py_create(h5py.string_dtype(), logical=True)


_ALL_PRESENT: dict[int, np.ndarray] = {}


def _all_present(count: int) -> np.ndarray:
    """``count`` ones (``is_data_present`` of a block present throughout), one read-only array per count."""
    ones = _ALL_PRESENT.get(count)
    if ones is None:
        if len(_ALL_PRESENT) >= 16:  # blocks have a few sizes; a new one now and then
            _ALL_PRESENT.clear()
        ones = _ALL_PRESENT[count] = np.ones(count, dtype="u1")
        ones.flags.writeable = False
    return ones


def _new_chunks(start: int, rows: int, chunk_rows: int) -> int:
    """Chunks (along the rows) that rows ``start..start+rows`` touch for the first time."""
    return -(-(start + rows) // chunk_rows) - -(-start // chunk_rows)


def _chunk_space(chunks: int, chunk_bytes: int, first: bool) -> int:
    """File space of ``chunks`` new chunks of ``chunk_bytes``, their index included (``first``: the index's root)."""
    if not chunks:
        return 0
    nodes = int(first) + chunks // INDEX_NODE_ENTRIES
    return chunks * (chunk_bytes + CHUNK_INDEX_BYTES) + nodes * INDEX_NODE_BYTES


def channel_attributes(spec: ChannelSpec) -> dict[str, Any]:
    """The attributes of a channel's group from its data-header entry (name, type, shape ..., display
    metadata), every text made storable; ``storage`` is added by the column."""
    return {key: attribute_value(storable(value)) for key, value in spec.metadata().items()}


def new_attributes(obj: h5py.HLObject, attributes: dict[str, Any]) -> None:
    """Attributes of an object just created (none of these names exist yet), with the low-level API.

    The same types h5py's ``attrs[key] = value`` gives (str: vlen UTF-8;
    numbers and arrays: their numpy type), without its per-attribute checks
    and temporary-name rename, which cost ~55 us each.
    """
    for key, value in attributes.items():
        if isinstance(value, str):
            data = np.array(value, dtype=h5py.string_dtype())
            type_id = _STRING_TYPE
        else:
            data = np.asarray(value)
            if data.dtype.kind not in "biuf" or data.dtype.byteorder == ">":
                obj.attrs[key] = value  # anything unusual: the high-level way
                continue
            type_id = h5py.h5t.py_create(data.dtype, logical=True)
        space = h5py.h5s.create(h5py.h5s.SCALAR) if data.ndim == 0 else h5py.h5s.create_simple(data.shape)
        h5py.h5a.create(obj.id, key.encode(), type_id, space).write(data)


def write_rows(dataset: h5py.h5d.DatasetID, start: int, rows: np.ndarray, extent: int) -> None:
    """Write ``rows`` (first axis = rows) at row ``start`` of a dataset of ``extent`` rows, low-level.

    The high-level ``dataset[a:b] = rows`` costs ~150 us of Python per call;
    a block write makes four such calls per channel, 2000 for a 500-channel
    stream, so this is where the block write's time went. The memory and
    file dataspaces (with the selection) depend only on the shapes, not on
    the dataset: one pair serves every channel of a block (``_block_spaces``).
    ``extent`` must be the dataset's current number of rows (every caller
    resizes to it just before): HDF5 checks the selection against the file
    dataspace given, not against the dataset. The call itself goes through
    ``h5.calls`` (ctypes where it can: h5py's binding was most of its cost).
    """
    memory_space, file_space = _block_spaces(extent, start, rows.shape)
    CALLS.write(dataset, memory_space, file_space, np.ascontiguousarray(rows))


_SPACES: dict[tuple, tuple[Any, Any]] = {}  # (extent, start, rows shape) -> (memory space, file space)


def _block_spaces(extent: int, start: int, shape: tuple[int, ...]) -> tuple[Any, Any]:
    key = (extent, start, shape)
    spaces = _SPACES.get(key)
    if spaces is None:
        if len(_SPACES) >= 64:  # a few shapes per block; older blocks' spaces are not needed again
            _SPACES.clear()
        row_shape = shape[1:]
        file_space = h5py.h5s.create_simple((extent, *row_shape), (h5py.h5s.UNLIMITED, *row_shape))
        file_space.select_hyperslab((start,) + (0,) * len(row_shape), shape)
        spaces = _SPACES[key] = (h5py.h5s.create_simple(shape), file_space)
    return spaces


def decode_or_absent(spec: ChannelSpec, part: Any, name: str) -> Any:
    """Decode a value that cannot be stored as sent; None (= absent) if it is broken."""
    try:
        return decode_value(spec, part)
    except Exception as error:  # one broken value must not stop the file
        logger.warning("channel %s: value not decodable (%s); stored as absent", name, error)
        return None


def column_class_for(spec: ChannelSpec, decompress_images: bool = False) -> type[Column]:
    """Storage for a channel, chosen by its first present value (``decompress_images``: never direct chunks)."""
    if spec.is_string:
        return StringColumn
    nbytes = np.dtype(spec.dtype).itemsize * math.prod(spec.array_shape)
    if (spec.compression == "bitshuffle_lz4" and not decompress_images
            and DIRECT_CHUNK_MIN_BYTES <= nbytes <= MAX_CHUNK_BYTES):
        return DirectChunkColumn
    return FixedColumn


_TEMPLATE_NAME = "sf_bsread_template"


class ColumnMaker:
    """Makes channel groups: the first of each kind made in full, every other one copied from it.

    Why: a group made dataset by dataset and attribute by attribute costs
    ~0.5-1 ms (four datasets, ten attributes, each an HDF5 call with h5py's
    per-object bookkeeping), which for a stream of thousands of channels is
    seconds before the first block is written. One ``H5Ocopy`` of a finished
    group of the same kind (class, type, shape, encoding, compression,
    modulo, offset) costs a third of that; its ``name`` attribute is then
    rewritten and the channel's display metadata (units, description ...)
    added. The templates live in an in-memory HDF5 file, so the output file
    holds nothing but the channels. The copy, the name and the four datasets'
    opening go through ``h5.calls`` (ctypes where it can): no h5py object is
    made for a copied group unless something asks (``Column.group``,
    ``Column.data``), which was ~200 of a copy's ~500 us (issue 24). The
    result is the same file (tests/test_h5format.py compares copies through
    ctypes, through h5py and groups made in full); ``copies=False`` makes
    every group in full.
    """

    def __init__(self, decompress_images: bool = False, copies: bool = True) -> None:
        self.decompress_images = decompress_images
        self.copies = copies
        self._templates: h5py.File | None = None
        # template key -> its group's name in the template file; None: that kind is made in full
        self._made: dict[tuple, bytes | None] = {}
        self._count = 0  # template names are never reused, even after a failed one

    def new(self, parent: h5py.Group, name: str, spec: ChannelSpec, rows_written: int) -> Column:
        """The column of ``spec`` in a new group ``parent[name]``, with ``rows_written`` absent rows."""
        cls = column_class_for(spec, self.decompress_images)
        template = self._template(cls, spec) if self.copies else None
        if template is None:
            return cls(parent.create_group(name), spec, rows_written)  # type: ignore[call-arg]
        # Through h5.calls (ctypes where it can): one copy, the name written, the datasets opened by
        # path; no h5py object unless the channel has display metadata (docs/performance.md, issue 24).
        link_name = name.encode("utf-8")
        CALLS.copy_group(self._templates.id, template, parent.id, link_name)
        datasets = CALLS.open_copy(parent.id, link_name, storable_text(spec.name), _DATASET_NAMES)
        column = cls(CopiedGroup(parent, name, *datasets), spec, rows_written)  # type: ignore[call-arg]
        if spec.display:
            attributes = channel_attributes(spec)
            new_attributes(column.group, {key: attributes[key] for key, _ in spec.display})
        return column

    def _template(self, cls: type[Column], spec: ChannelSpec) -> bytes | None:
        key = (cls, spec.type, spec.shape, spec.encoding, spec.compression, spec.modulo, spec.offset)
        if key in self._made:
            return self._made[key]
        if self._templates is None:
            self._templates = h5py.File(f"sf_bsread_templates_{id(self)}", "w", driver="core", backing_store=False)
        self._count += 1
        name = f"t{self._count}"
        try:
            self._build_template(cls, spec, name)
            made: bytes | None = name.encode()
        except Exception:  # noqa: BLE001 (whatever HDF5 refuses here: this kind is made in full)
            logger.warning("channel %s: no template for its kind; its groups are made in full", spec.name,
                           exc_info=True)
            made = None
        self._made[key] = made
        return made

    def _build_template(self, cls: type[Column], spec: ChannelSpec, name: str) -> None:
        plain = dataclasses.replace(spec, name=_TEMPLATE_NAME, display=())
        cls(self._templates.create_group(name), plain, 0)  # type: ignore[call-arg,union-attr]

    def close(self) -> None:
        if self._templates is not None:
            self._templates.close()
            self._templates = None
            self._made.clear()


_DATASET_NAMES = (b"data", b"pulse_id", b"is_data_present", b"timestamp")  # CopiedGroup's order
