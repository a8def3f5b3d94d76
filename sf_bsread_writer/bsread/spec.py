"""bsread's vocabulary: channel specifications, types, compressions, and why a message is refused.

The lowest layer of the wire format (pure): :class:`ChannelSpec` (one entry of a data header, normalised:
what every consumer sizes things by), :class:`RejectReason` and :class:`ProtocolError` (every rejection has
a stable reason, used as statistics key and Prometheus label, and a precise detail), :class:`IgnoredMessage`
(control messages are not errors), display text from a sender (units, descriptions, enum labels) made
storable once for every consumer. The rest of ``bsread`` builds on it: ``codecs`` (values <-> bytes),
``headers`` (main and data headers, their cache), ``message`` (a validated message), ``build`` (frames from
values). docs/bsread-format.md has the wire facts.
"""
from __future__ import annotations

import enum
import logging
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

__all__ = ["DECODING_REASONS", "BITSHUFFLE_BLOCK_BYTES", "CHANNEL_REFUSAL_REASONS", "COMPRESSIONS", "ChannelSpec", "DEFAULT_MAX_MESSAGE_BYTES", "DISPLAY_KEYS", "IgnoredMessage", "ProtocolError", "RejectReason", "TYPES", "display_metadata", "plain_text"]


logger = logging.getLogger(__name__)


#: A single bsread message larger than this is rejected as oversize. Large
#: enough for a 16 Mpixel uint32 image uncompressed; protects the ring.
DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024


#: Anything holding one part: bytes, bytearray, memoryview, zmq.Frame.
Frame = Any


class RejectReason(str, enum.Enum):
    """Why a message (or a value) was rejected. Values are stable statistics keys."""

    #: Part 0 is not valid JSON (or not UTF-8, or nested absurdly deep).
    MAIN_HEADER_NOT_JSON = "main_header_not_json"
    #: Part 0 is JSON but not an object.
    MAIN_HEADER_NOT_OBJECT = "main_header_not_object"
    #: ``htype`` missing or not a string.
    BAD_HTYPE = "bad_htype"
    #: ``pulse_id`` not an integer (bool, float and string are refused), negative, or beyond int64.
    BAD_PULSE_ID = "bad_pulse_id"
    #: ``global_timestamp`` not an object, or sec/ns of the wrong type or out of range. Never rejects a
    #: message any more (the time is replaced: ``MainHeader.timestamp_invalid``); a stable key still.
    BAD_TIMESTAMP = "bad_timestamp"
    #: ``hash`` missing, empty or not a string.
    BAD_HASH = "bad_hash"
    #: Data header missing, not decompressible, not JSON (the message), or a channel entry is malformed
    #: (name, shape, encoding, modulo, offset, a duplicate name, a declared size beyond the limit: that
    #: channel only, ``ChannelSpec.refused``).
    DATA_HEADER_INVALID = "data_header_invalid"
    #: ``dh_compression`` (the message) or a channel's ``compression`` (that channel) is not none/lz4/bitshuffle_lz4.
    UNKNOWN_COMPRESSION = "unknown_compression"
    #: A channel's ``type`` is not one of :data:`TYPES` (that channel only).
    UNKNOWN_TYPE = "unknown_type"
    #: Number of parts is not 2 + 2 * number of channels.
    PART_COUNT = "part_count"
    #: The message is larger than the parser's ``max_message_bytes``.
    OVERSIZE = "oversize"
    #: No parts at all, or an empty main header part.
    EMPTY_MESSAGE = "empty_message"
    #: A value part does not decode to the header's type and shape (decoding only, never parse()).
    VALUE_INVALID = "value_invalid"
    #: A channel timestamp part is neither empty nor 16 bytes, or no plausible time (decoding only, never parse()).
    CHANNEL_TIMESTAMP_INVALID = "channel_timestamp_invalid"

    def __str__(self) -> str:
        return self.value


#: The reasons a single channel of a data header can be refused for (``ChannelSpec.refused``).
CHANNEL_REFUSAL_REASONS = (RejectReason.DATA_HEADER_INVALID, RejectReason.UNKNOWN_TYPE,
                           RejectReason.UNKNOWN_COMPRESSION)


#: The reasons only decoding a value gives (``parse()`` never rejects a message for them).
DECODING_REASONS = frozenset({RejectReason.VALUE_INVALID, RejectReason.CHANNEL_TIMESTAMP_INVALID})


class ProtocolError(ValueError):
    """A message or value that violates the bsread format.

    ``reason`` is a :class:`RejectReason` (for counting), ``detail`` says
    exactly what was wrong, e.g. ``"pulse_id -5 is negative"``.
    """

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


class IgnoredMessage(Exception):
    """A control message (``htype`` not ``bsr_m-*``, e.g. ``bsr_stop-1.0``): skip it, it is no error."""

    def __init__(self, htype: str) -> None:
        super().__init__(htype)
        self.htype = htype

    def __str__(self) -> str:
        return f"control message {self.htype!r} ignored"


#: Channel types and their numpy type codes (strings travel as UTF-8 bytes).
TYPES: Mapping[str, str] = {
    "bool": "?",
    "int8": "i1", "uint8": "u1",
    "int16": "i2", "uint16": "u2",
    "int32": "i4", "uint32": "u4",
    "int64": "i8", "uint64": "u8",
    "float32": "f4", "float64": "f8",
    "string": "u1",
}


#: Value and data-header compressions.
COMPRESSIONS = frozenset(("none", "lz4", "bitshuffle_lz4"))


#: The block-size field that current producers and the HDF5 filter write (in bytes).
BITSHUFFLE_BLOCK_BYTES = 8192


_ENCODINGS = {"little": "little", "<": "little", "big": "big", ">": "big"}


_INT64_MAX = 2 ** 63 - 1


_NS_PER_SECOND = 1_000_000_000


_MAX_DIMENSIONS = 32  # numpy's limit


# An LZ4 sequence expands to at most ~255x its size; a size field claiming
# more is corrupt (and would make lz4 allocate it).
_LZ4_MAX_RATIO = 255


_LZ4_SLACK = 64


_BSHUF_MULT = 8  # bitshuffle block sizes are multiples of 8 elements


_BSHUF_MIN_BLOCK = 128


def _short(value: Any, limit: int = 60) -> str:
    """repr() cut to a size fit for a log line or a statistics detail."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return type(value) is int  # excludes bool, float, numpy scalars from JSON


def _json_input(frame: Frame) -> bytes | bytearray | str:
    """Something json.loads accepts, copying only when it must (headers are small)."""
    kind = type(frame)
    if kind is bytes or kind is bytearray or kind is str:
        return frame
    if kind is memoryview:
        return frame.tobytes()
    data = getattr(frame, "bytes", None)  # zmq.Frame
    if isinstance(data, bytes):
        return data
    return memoryview(frame).tobytes()


def _as_buffer(frame: Frame) -> bytes | bytearray | memoryview:
    """A bytes-like view of one part, without copying (zmq.Frame -> its ``.buffer``)."""
    kind = type(frame)
    if kind is bytes or kind is bytearray:
        return frame
    if kind is memoryview:
        return frame if frame.format == "B" and frame.ndim == 1 else frame.cast("B")
    buffer = getattr(frame, "buffer", None)  # zmq.Frame
    if isinstance(buffer, memoryview):
        return buffer
    return memoryview(frame).cast("B")


def _frame_size(frame: Frame) -> int:
    if type(frame) is memoryview:
        return frame.nbytes
    return len(frame)  # bytes, bytearray and zmq.Frame give bytes


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One channel of a data header, validated and normalized, with derived facts cached.

    ``shape`` is in header order (fastest dimension first); the numpy/HDF5
    shape of one value is :attr:`array_shape` (``shape[::-1]``). Input is
    normalized: ``type`` and ``compression`` lower case (``None`` ->
    ``"none"``), ``encoding`` ``"<"``/``">"`` -> ``"little"``/``"big"``,
    ``shape`` list -> tuple. Invalid input raises :class:`ProtocolError`.
    """

    name: str
    type: str = "float64"
    shape: tuple[int, ...] = (1,)
    encoding: str = "little"
    compression: str = "none"
    modulo: int = 1
    offset: int = 0
    #: Optional display metadata, ``(key, value)`` pairs in :data:`DISPLAY_KEYS` order; see there.
    display: tuple[tuple[str, Any], ...] = ()
    #: Set for a channel whose data-header entry was wrong (:meth:`refusal`): the reason; its values are
    #: never present (``Message.is_present``) and never decoded, and nothing is sized by it.
    refused: "RejectReason | None" = None
    refused_detail: str = ""
    # Derived once per header, not compared: the hot decode path only reads them.
    dtype: np.dtype = field(init=False, repr=False, compare=False)
    array_shape: tuple[int, ...] = field(init=False, repr=False, compare=False)
    is_string: bool = field(init=False, repr=False, compare=False)
    n_elements: int = field(init=False, repr=False, compare=False)
    nbytes: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        name, channel_type, shape = self.name, self.type, self.shape
        if type(name) is not str or not name:
            raise ProtocolError(RejectReason.DATA_HEADER_INVALID,
                                f"channel name {_short(name)} is not a non-empty string")
        if channel_type is None:
            channel_type = "float64"
        if type(channel_type) is not str or channel_type.lower() not in TYPES:
            raise ProtocolError(RejectReason.UNKNOWN_TYPE,
                                f"channel {name!r}: type {_short(channel_type)} is not one of {', '.join(TYPES)}")
        channel_type = channel_type.lower()
        if shape is None:
            shape = (1,)
        if not isinstance(shape, (list, tuple)) or not shape or len(shape) > _MAX_DIMENSIONS \
                or not all(_is_int(size) and size > 0 for size in shape):
            raise ProtocolError(RejectReason.DATA_HEADER_INVALID,
                                f"channel {name!r}: shape {_short(shape)} is not a list of 1 to "
                                f"{_MAX_DIMENSIONS} positive integers")
        shape = tuple(shape)
        encoding = self.encoding if self.encoding is not None else "little"
        encoding = _ENCODINGS.get(encoding.lower()) if type(encoding) is str else None
        if encoding is None:
            raise ProtocolError(RejectReason.DATA_HEADER_INVALID,
                                f"channel {name!r}: encoding {_short(self.encoding)} is not little or big")
        compression = self.compression if self.compression is not None else "none"
        if type(compression) is not str or compression.lower() not in COMPRESSIONS:
            raise ProtocolError(RejectReason.UNKNOWN_COMPRESSION,
                                f"channel {name!r}: compression {_short(compression)} is not one of "
                                "none, lz4, bitshuffle_lz4")
        compression = compression.lower()
        for key, value, minimum in (("modulo", self.modulo, 1), ("offset", self.offset, 0)):
            if value is None:
                set_(self, key, minimum)  # the defaults happen to be the minima
            elif not _is_int(value) or value < minimum:
                raise ProtocolError(RejectReason.DATA_HEADER_INVALID,
                                    f"channel {name!r}: {key} {_short(value)} is not an integer >= {minimum}")

        set_(self, "type", channel_type)
        set_(self, "shape", shape)
        set_(self, "encoding", encoding)
        set_(self, "compression", compression)
        is_string = channel_type == "string"
        dtype = np.dtype(("<" if encoding == "little" else ">") + TYPES[channel_type])
        n_elements = math.prod(shape)
        set_(self, "dtype", dtype)
        set_(self, "array_shape", shape[::-1])
        set_(self, "is_string", is_string)
        set_(self, "n_elements", n_elements)
        # A string's length varies from value to value: no fixed size.
        set_(self, "nbytes", None if is_string else n_elements * dtype.itemsize)
        if self.refused is not None:
            set_(self, "nbytes", 0)  # nothing may be sized by a refused channel (packed path, columns)

    @classmethod
    def refusal(cls, name: str, error: "ProtocolError") -> "ChannelSpec":
        """The placeholder of a channel whose data-header entry is wrong: ``name``, the error's reason and detail."""
        return cls(name, "float64", (1,), "little", "none", 1, 0, (), error.reason, error.detail)

    @classmethod
    def from_header(cls, entry: Any) -> "ChannelSpec":
        """Build from one data-header entry, applying the defaults Java senders omit."""
        if type(entry) is not dict:
            raise ProtocolError(RejectReason.DATA_HEADER_INVALID,
                                f"channel entry {_short(entry)} is not an object")
        get = entry.get
        return cls(get("name"), get("type"), get("shape"), get("encoding"), get("compression"),
                   get("modulo"), get("offset"), display_metadata(entry))

    @classmethod
    def for_value(cls, name: str, value: Any, compression: str = "none") -> "ChannelSpec":
        """The spec bsread's Sender would infer for ``value`` (None -> float64 [1], as bsread)."""
        if value is None:
            return cls(name, "float64", (1,), "little", compression)
        if isinstance(value, str):
            return cls(name, "string", (1,), "little", compression)
        array = np.asarray(value)
        if array.dtype.kind == "b":
            channel_type = "bool"
        else:
            channel_type = {code: key for key, code in TYPES.items() if key != "string"}.get(
                array.dtype.kind + str(array.dtype.itemsize))
            if channel_type is None:
                raise ValueError(f"channel {name!r}: numpy type {array.dtype} has no bsread type")
        shape = tuple(array.shape[::-1]) or (1,)
        byteorder = array.dtype.byteorder
        big = byteorder == ">" or (byteorder == "=" and sys.byteorder == "big")
        return cls(name, channel_type, shape, "big" if big else "little", compression)

    def metadata(self) -> dict[str, Any]:
        """JSON-able description: the data-header entry, also used as HDF5 attributes."""
        entry = {"name": self.name, "type": self.type, "shape": list(self.shape),
                 "encoding": self.encoding, "compression": self.compression,
                 "modulo": self.modulo, "offset": self.offset}
        for key, value in self.display:
            entry[key] = list(value) if isinstance(value, tuple) else value
        if self.refused is not None:
            entry["refused"] = f"{self.refused.value}: {self.refused_detail}"
        return entry

    def display_value(self, key: str, default: Any = None) -> Any:
        """One display-metadata value (``unit``, ``precision``, ...), or ``default``."""
        for name, value in self.display:
            if name == key:
                return value
        return default


def _checked_text(value: Any) -> str | None:
    if type(value) is not str or len(value) > _MAX_DISPLAY_TEXT:
        return None
    return plain_text(value)  # here, once for every consumer of the display metadata


def _checked_precision(value: Any) -> int | None:
    return value if _is_int(value) and 0 <= value <= 17 else None


def _checked_strings(value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, (list, tuple)) or len(value) > _MAX_ENUM_STRINGS:
        return None
    checked = tuple(_checked_text(item) for item in value)
    return None if None in checked else checked  # type: ignore[return-value]


def plain_text(text: str) -> str:
    """``text`` with NUL and lone surrogates as U+FFFD.

    JSON can carry both (``"\\u0000"``, ``"\\ud800"``); no EPICS record field,
    HDF5 string attribute (NUL ends a C string) or UTF-8 encoder takes them.
    """
    return _NOT_TEXT.sub("\ufffd", text)


_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


_MAX_DISPLAY_TEXT = 256


_MAX_ENUM_STRINGS = 64


#: Display metadata a data-header entry may carry beside the bsread keys, with its check.
#: bsread itself defines none of them; the CA bridge sends them for IOC PVs (EGU, PREC,
#: enum state strings, DESC) and any sender may. They are kept with the channel, written
#: as HDF5 attributes of its group and served as record fields by the CA gateway. A
#: malformed one is dropped (logged nowhere: the core does no I/O), never the message:
#: it describes the data, it is not the data.
DISPLAY_KEYS: dict[str, Callable[[Any], Any]] = {
    "unit": _checked_text,
    "precision": _checked_precision,
    "enum_strings": _checked_strings,
    "description": _checked_text,
}


def display_metadata(entry: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The valid display metadata of one data-header entry, in :data:`DISPLAY_KEYS` order."""
    found = []
    for key, check in DISPLAY_KEYS.items():
        raw = entry.get(key)
        if raw is not None:
            value = check(raw)
            if value is not None:
                found.append((key, value))
    return tuple(found)


_Timestamp = Union[float, int, tuple[int, int]]
