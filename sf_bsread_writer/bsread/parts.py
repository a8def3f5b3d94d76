"""One multipart message in the packed form: the small parts in one ``bytes``, the large ones by reference.

A bsread message has 2 + 2N parts for N channels. At 500 channels those are
1002 parts of 8-16 bytes, and a Python object per part (a ``zmq.Frame``, a
``bytes``) costs far more than the payload; the per-part cost of moving them
through Python, not the bytes, is what limits every Python forwarder (issue
10, docs/performance.md). So a message travels through the buffer and the
writer as a :class:`PackedParts`:

* ``small``: every part below ``LARGE_PART_BYTES`` except part 1,
  concatenated in order, in one ``bytes``;
* ``header``: part 1 (the bsread data header, the same ~80 bytes per channel
  in every message): its own ``bytes``, so that consecutive messages share
  one object (the receivers pass the previous message's header as a hint);
* ``large``: the parts of ``LARGE_PART_BYTES`` or more (images, big
  arrays), as the objects received (zero-copy, immutable);
* ``layout``: the part lengths, with what is derived from them once per
  distinct lengths (where each part lives). Consecutive messages of one
  stream share one :class:`Layout`.

``PackedParts`` is a read-only sequence of its parts (small ones as
memoryviews into ``small``), so everything written for a list of frames
(the parser, ``Message.value_part``) takes it unchanged; the hot paths read
``small``/``layout`` directly. The compiled receiver
(``transport.partsio``) produces exactly this form in one call per message;
:func:`pack` builds it from a list of frames (the pure fallback, tests).

Pure: no sockets, no clock.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["LARGE_PART_BYTES", "Layout", "LayoutCache", "PackedParts", "bit_indices", "encode_lengths", "pack",
           "presence_bits"]

#: Parts at least this large are kept by reference (zero-copy); smaller ones
#: are packed. Equal to pyzmq's default ``zmq.COPY_THRESHOLD``: below it pyzmq
#: copies on send even with ``copy=False``, so a reference would buy nothing.
LARGE_PART_BYTES = 65536

#: The dtype of ``Layout.key``: one native int64 per part (what the compiled receiver writes).
LENGTH_DTYPE = np.dtype(np.int64)

# Where a part lives (Layout.where): in ``small``, the data header, or ``large``.
SMALL, HEADER, LARGE = 0, 1, 2


def presence_bits(value_lengths: Any) -> int:
    """Bit i set: channel i has a value, from the lengths of the value parts (parts 2, 4, ...; empty = absent).

    One int for a whole message, so "which channels does this one have that that one lacks" is
    ``a & ~b`` (``rates.SparseAwareGrid``, the CA gateway's sparse-channel ingest).
    """
    present = np.asarray(value_lengths) > 0
    return int.from_bytes(np.packbits(present, bitorder="little").tobytes(), "little")


def bit_indices(bits: int) -> list[int]:
    """The channel indices of :func:`presence_bits`'s set bits."""
    flags = np.unpackbits(np.frombuffer(bits.to_bytes((bits.bit_length() + 7) // 8 or 1, "little"), dtype=np.uint8),
                          bitorder="little")
    return np.flatnonzero(flags).tolist()


def encode_lengths(lengths: Sequence[int]) -> bytes:
    """Part lengths as a layout key: native int64s (``Layout.key``)."""
    return np.asarray(lengths, dtype=LENGTH_DTYPE).tobytes()


class Layout:
    """Where each part of a message lives, derived once per distinct list of part lengths.

    ``key`` is the lengths as native int64 bytes (hashable, compared with a
    memcmp); ``lengths`` the same as a numpy array. ``where[i]`` is
    ``(SMALL, start, stop)`` (a slice of ``small``), ``(HEADER, 0, n)`` or
    ``(LARGE, k, n)`` (the k-th large part). ``small_slices`` and
    ``inserts`` rebuild the part list quickly (:meth:`PackedParts.frames`).
    """

    __slots__ = ("key", "lengths", "n_parts", "nbytes", "small_bytes", "where", "small_slices", "inserts",
                 "n_large", "_presence", "__weakref__")

    def __init__(self, key: bytes) -> None:
        lengths = np.frombuffer(key, dtype=LENGTH_DTYPE)
        self.key = key
        self.lengths = lengths
        self.n_parts = len(lengths)
        self.nbytes = int(lengths.sum())
        where: list[tuple[int, int, int]] = []
        small_slices: list[slice] = []
        inserts: list[tuple[int, int]] = []
        offset = 0
        n_large = 0
        for index, length in enumerate(lengths.tolist()):
            if index == 1:
                where.append((HEADER, 0, length))
                inserts.append((1, -1))
            elif length >= LARGE_PART_BYTES:
                where.append((LARGE, n_large, length))
                inserts.append((index, n_large))
                n_large += 1
            else:
                where.append((SMALL, offset, offset + length))
                small_slices.append(slice(offset, offset + length))
                offset += length
        self.where = where
        self.small_slices = small_slices
        self.inserts = inserts
        self.n_large = n_large
        self.small_bytes = offset
        self._presence: int | None = None

    @property
    def presence(self) -> int:
        """Bit i set: channel i has a value (a non-empty value part); computed once per layout.

        What a rate-limited feed needs to keep a sparse channel (``rates.SparseAwareGrid``).
        """
        if self._presence is None:
            self._presence = presence_bits(self.lengths[2::2])
        return self._presence

    def __repr__(self) -> str:
        return f"Layout({self.n_parts} parts, {self.nbytes} bytes, {self.n_large} large)"


class LayoutCache:
    """The layouts of the last few distinct part-length lists (a receiver's or a ring's).

    A stream alternates between a few layouts at most (a channel absent every
    other message); keeping them lets everything cached per layout (the h5
    gather plans) survive the alternation.
    """

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, Layout] = OrderedDict()
        self.last: Layout | None = None

    def get(self, key: bytes) -> Layout:
        last = self.last
        if last is not None and (key is last.key or key == last.key):
            return last
        layout = self._entries.get(key)
        if layout is None:
            layout = self._entries[key] = Layout(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        self.last = layout
        return layout


class PackedParts(Sequence):
    """One multipart message in the packed form (module docstring): a read-only sequence of its parts.

    ``parts[i]`` is a read-only memoryview into ``small`` for a small part,
    the ``header`` bytes for part 1, the stored object for a large part.
    ``len(parts)`` is the number of parts, ``nbytes`` their total size.
    """

    __slots__ = ("layout", "small", "header", "large")

    def __init__(self, layout: Layout, small: bytes, header: bytes | None, large: tuple = ()) -> None:
        self.layout = layout
        self.small = small
        self.header = header
        self.large = large

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def __len__(self) -> int:
        return self.layout.n_parts

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.layout.n_parts))]
        kind, a, b = self.layout.where[index]
        if kind == SMALL:
            return memoryview(self.small)[a:b]
        if kind == HEADER:
            return self.header
        return self.large[a]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.frames())

    def frames(self) -> list:
        """Every part in order, as a new list (for a per-part send, ``send_multipart(copy=False)``)."""
        layout = self.layout
        parts = list(map(memoryview(self.small).__getitem__, layout.small_slices))
        for index, source in layout.inserts:
            parts.insert(index, self.header if source < 0 else self.large[source])
        return parts

    def with_header(self, header: bytes) -> "PackedParts":
        """The same message with an equal header object (to share one copy between messages)."""
        return PackedParts(self.layout, self.small, header, self.large)

    def __repr__(self) -> str:
        return f"PackedParts({self.layout!r})"


def _immutable(part: Any) -> bool:
    """Whether nobody can change ``part`` after we took it: ``bytes``, a ``zmq.Frame`` or a compiled part.

    Only those large parts are kept by reference; any other buffer
    (bytearray, memoryview, numpy array, mmap) is copied, because its owner
    could still write to it. The types are recognised by module so that the
    core needs no import of zmq or the extension.
    """
    kind = type(part)
    return kind is bytes or (kind.__name__ in ("Frame", "Part")
                             and kind.__module__.startswith(("zmq.", "sf_bsread_writer.")))


def _length(part: Any) -> int:
    return part.nbytes if type(part) is memoryview else len(part)


def pack(frames: Sequence[Any], layouts: LayoutCache | None = None,
         previous_header: bytes | None = None) -> PackedParts:
    """A list of frames (bytes, zmq.Frame, any buffer) -> :class:`PackedParts` (copies the small parts).

    ``previous_header``: the data header of the previous message; when part 1
    is byte-identical, that object is used (one copy for the whole stream).
    A :class:`PackedParts` is returned as it is.
    """
    if type(frames) is PackedParts:
        return frames
    if not frames:
        raise ValueError("a message has at least one part")
    key = encode_lengths([_length(f) for f in frames])
    layout = layouts.get(key) if layouts is not None else Layout(key)
    small_parts = [frames[i] for i, (kind, _, _) in enumerate(layout.where) if kind == SMALL]
    small = b"".join(small_parts)
    header = None
    if layout.n_parts > 1:
        part = frames[1]
        header = part if type(part) is bytes else bytes(part)
        if previous_header is not None and header is not previous_header and header == previous_header:
            header = previous_header
    large: tuple = ()
    if layout.n_large:
        large = tuple(frames[i] if _immutable(frames[i]) else bytes(frames[i])
                      for i, (kind, _, _) in enumerate(layout.where) if kind == LARGE)
    return PackedParts(layout, small, header, large)
