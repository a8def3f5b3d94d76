"""A validated bsread message: :class:`MessageParser` turns ZeroMQ frames into a :class:`Message`.

Pure. Validate cheaply, decode lazily: :meth:`MessageParser.parse` checks what the buffer must know before
it stores or forwards a message (main header, size, data header, part count) and nothing more; values are
decoded only when a consumer asks (:meth:`Message.value`). Not thread safe: one parser per thread.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sf_bsread_writer.bsread.codecs import decode_timestamp, decode_value
from sf_bsread_writer.bsread.headers import (
    DataHeader,
    DataHeaderCache,
    MainHeader,
    parse_main_header,
)
from sf_bsread_writer.bsread.parts import PackedParts
from sf_bsread_writer.bsread.spec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Frame,
    ProtocolError,
    RejectReason,
    _as_buffer,
    _frame_size,
)
from sf_bsread_writer.bsread.timebase import plausible_stamp

__all__ = ["Message", "MessageParser"]


@dataclass(frozen=True, slots=True)
class Message:
    """A validated message: headers parsed, values still raw in ``frames``.

    ``frames`` are the parts exactly as received (zero copy); channel ``i``
    has its value in part ``2 + 2 * i`` and its timestamp in ``3 + 2 * i``.
    ``nbytes`` is the total size of all parts (0 if not computed).
    """

    main: MainHeader
    data_header: DataHeader
    frames: tuple
    nbytes: int = 0

    @property
    def pulse_id(self) -> int:
        return self.main.pulse_id

    @property
    def timestamp(self) -> float:
        return self.main.timestamp

    @property
    def n_channels(self) -> int:
        return len(self.data_header.channels)

    def _check(self, i: int) -> None:
        if not 0 <= i < len(self.data_header.channels):
            raise IndexError(f"channel index {i} out of range (message has {self.n_channels} channels)")

    def value_part(self, i: int) -> bytes | bytearray | memoryview:
        """Raw (possibly compressed) value bytes of channel ``i``; empty when absent."""
        self._check(i)
        return _as_buffer(self.frames[2 + 2 * i])

    def timestamp_part(self, i: int) -> bytes | bytearray | memoryview:
        """Raw timestamp bytes of channel ``i`` (16 bytes, or empty when absent)."""
        self._check(i)
        return _as_buffer(self.frames[3 + 2 * i])

    def is_present(self, i: int) -> bool:
        """True if channel ``i`` has data: an empty value part means "no data" whatever the timestamp,
        and a refused channel (``ChannelSpec.refused``) has none whatever its part holds."""
        self._check(i)
        return _frame_size(self.frames[2 + 2 * i]) > 0 and self.data_header.channels[i].refused is None

    def value(self, i: int) -> np.ndarray | str | None:
        """Decoded value of channel ``i`` (see :func:`decode_value`)."""
        self._check(i)
        return decode_value(self.data_header.channels[i], self.frames[2 + 2 * i])

    def channel_timestamp(self, i: int) -> tuple[int, int] | None:
        """(sec, ns) of channel ``i`` (see :func:`decode_timestamp`)."""
        self._check(i)
        return decode_timestamp(self.data_header.channels[i], self.frames[3 + 2 * i])

    def channel_seconds(self, i: int) -> float:
        """Channel ``i``'s own timestamp in seconds, else the message's.

        Else: absent, ``(0, 0)`` ("not given"), no plausible time (``bsread.timebase.plausible_stamp``),
        or a part that is not 16 bytes
        (the parser does not check timestamp parts; a malformed one costs the
        value its own time, never the value: what every consumer shows).
        """
        self._check(i)
        part = self.frames[3 + 2 * i]
        if _frame_size(part) != 16:
            return self.timestamp
        sec, ns = struct.unpack("<qq" if self.data_header.channels[i].encoding == "little" else ">qq",
                                _as_buffer(part))
        return sec + ns * 1e-9 if (sec or ns) and plausible_stamp(sec, ns) else self.timestamp


class MessageParser:
    """Frames -> :class:`Message`: every check the buffer needs, no value decoding.

    Order of checks: empty, oversize (before any JSON is parsed), main
    header (may raise :class:`IgnoredMessage`), data header (cached by
    hash), part count.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, cache_entries: int = 64) -> None:
        self.max_message_bytes = max_message_bytes
        self.cache = DataHeaderCache(cache_entries, max_value_bytes=max_message_bytes)

    def parse(self, frames: Sequence[Frame]) -> Message:
        n_parts = len(frames)
        if n_parts == 0:
            raise ProtocolError(RejectReason.EMPTY_MESSAGE, "message has no parts")
        # len() is the byte count of bytes, bytearray, zmq.Frame and byte memoryviews; a packed message knows.
        nbytes = frames.nbytes if type(frames) is PackedParts else sum(map(len, frames))
        if nbytes > self.max_message_bytes:
            raise ProtocolError(RejectReason.OVERSIZE,
                                f"message has {nbytes} bytes, more than the limit of {self.max_message_bytes}")
        if _frame_size(frames[0]) == 0:
            raise ProtocolError(RejectReason.EMPTY_MESSAGE, "main header part is empty")
        main = parse_main_header(frames[0])
        if n_parts < 2:
            raise ProtocolError(RejectReason.PART_COUNT,
                                "expected 2 + 2*N parts, got 1 (no data header)")
        data_header = self.cache.get(main.hash, frames[1], main.dh_compression)
        n_channels = len(data_header.channels)
        expected = 2 + 2 * n_channels
        if n_parts != expected:
            raise ProtocolError(RejectReason.PART_COUNT,
                                f"expected 2 + 2*{n_channels} = {expected} parts, got {n_parts}")
        # A packed message stays packed (a Sequence of its parts): the writer's fast path reads it directly.
        kind = type(frames)
        return Message(main, data_header, frames if kind is tuple or kind is PackedParts else tuple(frames), nbytes)
