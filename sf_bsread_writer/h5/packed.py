"""The packed fast path: the uncompressed fixed-size channels of a message gathered in two joins.

For a 500-channel scalar stream a Python step per channel per message is
where the time would go. A :class:`HeaderPlan` (built once per data
header) says which channels are *packed* (uncompressed numbers of a fixed
size, in a buffered column): their value and timestamp parts are gathered
per message with two ``bytes.join`` calls into :class:`PackedRows`, and
handed to their columns block-wise, one numpy slice per channel
(:meth:`PackedRows.scatter`). Everything else goes channel by channel.

A message that arrives packed (``bsread.parts.PackedParts``, what the
compiled receiver delivers) is gathered without touching its parts one by
one: per distinct layout the plan works out, with numpy, where each packed
channel's value and timestamp bytes sit in the message's ``small`` bytes
(:class:`LayoutGather`), and each message is then two numpy takes. Where the
packed channels all have one size and follow each other (value, timestamp,
value, ...: a scalar stream), the two takes are two strided copies
(``LayoutGather.regular``: a tenth of the cost, issue 24).
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from sf_bsread_writer.bsread.parts import LARGE_PART_BYTES, Layout, PackedParts
from sf_bsread_writer.bsread.spec import ChannelSpec
from sf_bsread_writer.h5.columns import Column, FixedColumn, column_class_for
from sf_bsread_writer.h5.layout import ABSENT_TIMESTAMP, TIMESTAMP_BYTES

__all__ = ["HeaderPlan", "PackedRows", "PACKED_MAX_VALUE_BYTES"]

# Channels with larger values go channel by channel: an absent value in the
# packed path is a row of zeros in the gathered segment, so only small ones
# (scalars, short waveforms) are packed.
PACKED_MAX_VALUE_BYTES = 4096

#: Element types that copy a value of that many bytes as its bits (numpy copies an array of one
#: type to the same type bit for bit, NaN payloads included; complex128 is 16 plain bytes here).
_BIT_COPY_TYPES = {1: np.dtype("u1"), 2: np.dtype("u2"), 4: np.dtype("u4"), 8: np.dtype("u8"),
                   16: np.dtype("c16")}


class HeaderPlan:
    """How the messages of one data header are taken apart (built once per header change).

    ``packed`` are the channels whose value part is stored as sent
    (uncompressed numbers of a fixed size, in a buffered column): for them a
    message costs two ``bytes.join`` calls and a length check instead of a
    Python step per channel — a 500-channel scalar stream is otherwise
    dominated by that loop. Everything else (strings, compressed values,
    direct chunks, a packed value of the wrong size) goes channel by channel.
    """

    def __init__(self, header: Any, columns: list[Column | None]) -> None:
        self.header = header
        self.columns = columns  # column of each channel index, None until its first present value
        self.packed: list[int] = []
        self.others: list[int] = []
        for index, spec in enumerate(header.channels):
            column = columns[index]
            packable = (not spec.is_string and spec.compression == "none" and spec.nbytes
                        and spec.nbytes <= PACKED_MAX_VALUE_BYTES
                        and (column is None or isinstance(column, FixedColumn))
                        and (column is not None or column_class_for(spec) is FixedColumn))
            (self.packed if packable else self.others).append(index)
        packed_specs = [header.channels[i] for i in self.packed]
        self.expected = [spec.nbytes for spec in packed_specs]
        self.expected_stamps = [TIMESTAMP_BYTES] * len(self.packed)
        self.zero_values = [bytes(n) for n in self.expected]
        self.offsets = np.concatenate([[0], np.cumsum(self.expected, dtype=np.int64)]).astype(np.int64)
        self.row_nbytes = int(self.offsets[-1])
        self.all_present = b"\x01" * len(self.packed)
        value_indices = [2 + 2 * i for i in self.packed]
        stamp_indices = [3 + 2 * i for i in self.packed]
        self.values_of = frames_getter(value_indices)
        self.stamps_of = frames_getter(stamp_indices)
        self.value_parts = np.asarray(value_indices, dtype=np.int64)
        self.expected_array = np.asarray(self.expected, dtype=np.int64)
        # byte k of the packed row lies this far into its channel's value
        self.within = (np.arange(self.row_nbytes, dtype=np.int64)
                       - np.repeat(self.offsets[:-1], self.expected_array))
        self.stamp_within = np.tile(np.arange(TIMESTAMP_BYTES, dtype=np.int64), len(self.packed))
        self._gathers: dict[Layout, LayoutGather | None] = {}

    def gather_for(self, layout: Layout) -> "LayoutGather | None":
        """Where this plan's packed channels sit in a message of ``layout``; None: a value of the wrong size."""
        try:
            return self._gathers[layout]
        except KeyError:
            pass
        if len(self._gathers) >= MAX_LAYOUT_GATHERS:
            self._gathers.clear()
        gather = self._gathers[layout] = LayoutGather.build(self, layout)
        return gather


#: Layouts remembered per plan (a stream alternates between a few: channels absent every Nth pulse).
MAX_LAYOUT_GATHERS = 16


class LayoutGather:
    """For one (plan, layout): numpy indices of the packed channels' bytes in a message's ``small`` bytes.

    Absent values and timestamps (and timestamps of the wrong size) index a
    run of zeros appended to ``small`` (``pad`` bytes; the absent marker is
    all zeros). Built once per layout; a message is then two takes.

    ``regular``: when every packed value is present with its timestamp, all of
    one size, one channel's parts right after the other's (a scalar stream),
    ``(value type, first value's offset, first timestamp's offset, stride)``:
    a message is then two strided copies instead of two takes. None otherwise.
    """

    __slots__ = ("value_index", "stamp_index", "pad", "present", "accepted", "absent", "regular")

    def __init__(self, value_index: np.ndarray, stamp_index: np.ndarray, pad: bytes, present: bytes,
                 accepted: int, absent: int, regular: tuple[np.dtype, int, int, int] | None = None) -> None:
        self.value_index = value_index
        self.stamp_index = stamp_index
        self.pad = pad
        self.present = present
        self.accepted = accepted
        self.absent = absent
        self.regular = regular

    @classmethod
    def build(cls, plan: HeaderPlan, layout: Layout) -> "LayoutGather | None":
        """None when the layout does not fit the plan (too few parts) or a packed value has the wrong size."""
        lengths = layout.lengths
        n_parts = len(lengths)
        value_parts = plan.value_parts
        if not len(value_parts) or int(value_parts[-1]) + 1 >= n_parts:
            return None
        parts = np.arange(n_parts)
        in_small = (parts != 1) & (lengths < LARGE_PART_BYTES)
        small_lengths = np.where(in_small, lengths, 0)
        starts = np.cumsum(small_lengths) - small_lengths
        value_lengths = lengths[value_parts]
        expected = plan.expected_array
        present = (value_lengths == expected) & in_small[value_parts]
        if bool(((value_lengths != 0) & ~present).any()):
            return None  # a value of the wrong size: that message goes channel by channel
        stamp_parts = value_parts + 1
        stamp_ok = present & (lengths[stamp_parts] == TIMESTAMP_BYTES) & in_small[stamp_parts]
        pad_at = layout.small_bytes
        value_base = np.where(present, starts[value_parts], pad_at)
        stamp_base = np.where(stamp_ok, starts[stamp_parts], pad_at)
        needs_pad = not (bool(present.all()) and bool(stamp_ok.all()))
        pad = bytes(max(int(expected.max()), TIMESTAMP_BYTES)) if needs_pad else b""
        regular = None
        size = int(expected[0])
        if not needs_pad and size in _BIT_COPY_TYPES and bool((expected == size).all()):
            stride = size + TIMESTAMP_BYTES
            if (bool((np.diff(value_base) == stride).all())
                    and bool((stamp_base == value_base + size).all())):
                regular = (_BIT_COPY_TYPES[size], int(value_base[0]), int(stamp_base[0]), stride)
        return cls(np.repeat(value_base, expected) + plan.within,
                   np.repeat(stamp_base, TIMESTAMP_BYTES) + plan.stamp_within,
                   pad, present.astype(np.uint8).tobytes(), int(value_lengths[present].sum()),
                   int((~present).sum()), regular)


_STAMP_BITS = _BIT_COPY_TYPES[TIMESTAMP_BYTES]


def frames_getter(indices: list[int]) -> Callable[[Any], tuple]:
    """``frames -> tuple of frames[i] for i in indices`` (always a tuple)."""
    if len(indices) == 1:
        only = indices[0]
        return lambda frames: (frames[only],)
    if not indices:
        return lambda frames: ()
    return operator.itemgetter(*indices)


class PackedRows:
    """Rows of the packed channels, gathered per message and handed to the columns in one go.

    Holds consecutive block rows ``first_row .. first_row + count`` of one
    plan; the file calls :meth:`scatter` before anything else touches the
    columns (a new plan, a slow-path value, a block write, a truncate).
    """

    def __init__(self) -> None:
        self.first_row = 0
        self.count = 0
        self._values = bytearray()
        self._stamps = bytearray()
        self._present = bytearray()

    def add(self, plan: HeaderPlan, frames: Any, row: int,
            column_for: Callable[[ChannelSpec], Column | None]) -> tuple[int, int] | None:
        """Gather the packed channels' parts of one message as block row ``row``.

        Returns (value bytes accepted, absent values), or None if a packed
        value has the wrong size (the caller then takes the message channel
        by channel).
        """
        if type(frames) is PackedParts:
            return self._add_packed(plan, frames, row, column_for)
        values = plan.values_of(frames)
        stamps = plan.stamps_of(frames)
        lengths = list(map(len, values))
        accepted = sum(lengths)
        absent = 0
        present: bytes | bytearray = plan.all_present
        if lengths != plan.expected:
            values, stamps, present = list(values), list(stamps), bytearray(present)
            for j, (length, expected) in enumerate(zip(lengths, plan.expected)):
                if length == expected:
                    continue
                if length:
                    return None
                values[j] = plan.zero_values[j]
                stamps[j] = ABSENT_TIMESTAMP
                present[j] = 0
                absent += 1
        if list(map(len, stamps)) != plan.expected_stamps:
            stamps = [stamp if len(stamp) == TIMESTAMP_BYTES else ABSENT_TIMESTAMP for stamp in stamps]
        if self.count and self.first_row + self.count != row:
            self.scatter(plan, column_for)
        if not self.count:
            self.first_row = row
        self._values += b"".join(values)
        self._stamps += b"".join(stamps)
        self._present += present
        self.count += 1
        return accepted, absent

    def _add_packed(self, plan: HeaderPlan, message: PackedParts, row: int,
                    column_for: Callable[[ChannelSpec], Column | None]) -> tuple[int, int] | None:
        """:meth:`add` for a packed message: two numpy takes from its ``small`` bytes (:class:`LayoutGather`)."""
        gather = plan.gather_for(message.layout)
        if gather is None:
            return None
        if self.count and self.first_row + self.count != row:
            self.scatter(plan, column_for)
        if not self.count:
            self.first_row = row
        regular = gather.regular
        if regular is not None:
            kind, value_offset, stamp_offset, stride = regular
            small, n = message.small, len(plan.packed)
            values = np.ndarray((n,), kind, small, value_offset, (stride,))
            stamps = np.ndarray((n,), _STAMP_BITS, small, stamp_offset, (stride,))
        else:
            source = np.frombuffer(message.small + gather.pad if gather.pad else message.small, dtype=np.uint8)
            values = source.take(gather.value_index)
            stamps = source.take(gather.stamp_index)
        # memoryview of a contiguous copy, not `+= array`: numpy would add
        self._values += memoryview(np.ascontiguousarray(values))
        self._stamps += memoryview(np.ascontiguousarray(stamps))
        self._present += gather.present
        self.count += 1
        return gather.accepted, gather.absent

    def drop_from(self, row: int) -> None:
        """Forget gathered rows from block row ``row`` on (an append that failed half-way)."""
        if not self.count or self.first_row + self.count <= row:
            return
        keep = max(0, row - self.first_row)
        for name in ("_values", "_stamps", "_present"):
            data = getattr(self, name)
            del data[keep * (len(data) // self.count):]
        self.count = keep

    def scatter(self, plan: HeaderPlan | None, column_for: Callable[[ChannelSpec], Column | None]) -> None:
        """Hand the gathered rows to their columns (``column_for`` creates a column at its first value;
        None: the channel was refused)."""
        count = self.count
        if not count:
            return
        assert plan is not None
        packed = plan.packed
        values = np.frombuffer(self._values, dtype="u1").reshape(count, plan.row_nbytes)
        stamps = np.frombuffer(self._stamps, dtype="u1").reshape(count, TIMESTAMP_BYTES * len(packed))
        present = np.frombuffer(self._present, dtype="u1").reshape(count, len(packed))
        all_present = bool(present.all())
        offsets = plan.offsets
        channels = plan.header.channels
        for j, index in enumerate(packed):
            column_present = present[:, j]
            if not all_present and not column_present.any():
                continue  # absent throughout: padding does it, and no column before a first value
            column = plan.columns[index]
            if column is None:
                column = plan.columns[index] = column_for(channels[index])
                if column is None:  # a refused channel: its values are dropped
                    continue
            column.append_batch(channels[index], self.first_row, values[:, offsets[j]:offsets[j + 1]],
                                stamps[:, TIMESTAMP_BYTES * j:TIMESTAMP_BYTES * (j + 1)],
                                np.ascontiguousarray(column_present))
        self.count = 0
        self._values = bytearray()
        self._stamps = bytearray()
        self._present = bytearray()
