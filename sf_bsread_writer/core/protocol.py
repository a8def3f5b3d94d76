"""bsread wire protocol: ZeroMQ frames -> validated :class:`Message`, values <-> bytes.

This is the pure core shared by the buffer, the writer, the CA gateway and
the CA bridge. It never touches a socket, a thread or a file: frames go in,
typed records and exceptions come out (and :func:`build_message` turns
values into frames). The shells around it own all I/O.

Design
------
* **Validate cheaply, decode lazily.** :meth:`MessageParser.parse` checks
  everything the buffer must know before it stores or forwards a message
  (main header, size, data header, part count) and nothing more. Values are
  decoded only when a consumer asks (:meth:`Message.value`), because the
  buffer never needs them and the writer can often store a
  ``bitshuffle_lz4`` part unchanged (:func:`direct_chunk_compatible`).
* **Data headers are parsed once per hash.** Every message carries its data
  header, but a stream changes it rarely; :class:`DataHeaderCache` keeps the
  parsed :class:`DataHeader` by the main header's ``hash`` (LRU bounded).
  The hash is a cache key only: like every bsread receiver we do not verify
  the MD5. A data header that fails to parse is cached as a failure too, so
  a flood of identical bad messages costs one parse (a failure is only
  reused for the very same bytes, so a bad header cannot poison the hash
  of a good one).
* **Every rejection has a stable reason.** :class:`ProtocolError` carries a
  :class:`RejectReason` (used as statistics key and Prometheus label) and a
  precise human detail. Control messages (Java's ``bsr_stop-1.0``, ...)
  raise :class:`IgnoredMessage` instead: they are not errors.
* **Accept every producer's variant** (see docs/bsread-format.md): defaults
  that Java senders omit, ``{"epoch", "ns"}`` timestamps, the LZ4 size field
  in either byte order, the pre-2018 bitshuffle block size in elements.
* **Never crash on hostile bytes.** ``bitshuffle.decompress_lz4`` trusts the
  block sizes inside the stream and segfaults on a corrupt one, so the block
  structure is walked and bounds-checked here before it is called.

Decisions worth knowing
-----------------------
* A missing ``pulse_id`` is 0 (Java omits fields equal to their default).
  A missing ``global_timestamp`` is ``(0, 0)``, meaning "not given", as
  bsread's own receiver accepts it. Within it, missing ``sec``/``epoch`` or
  ``ns`` is 0. ``ns`` must lie in ``[0, 1e9)``; ``sec`` must be >= 0.
* A missing data-header ``channels`` list is an empty list (Java omits it).
* String values are decoded as UTF-8 with ``errors="replace"``: a bad byte
  shows up as U+FFFD instead of losing the whole value.
* Numeric values come back as a **read-only** numpy view on the frame when
  uncompressed (zero copy); copy it before modifying.
* :func:`decode_timestamp` raises on a timestamp part that is neither empty
  nor 16 bytes long (reason ``channel_timestamp_invalid``): a consumer can
  count it and still use the value. ``Message.channel_seconds`` (what the web
  service, the CA gateway and ranges show) takes the message's time instead.

Not thread safe: give each thread its own :class:`MessageParser`.
"""
from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import re
import struct
import sys
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, Union

import bitshuffle
import lz4.block
import numpy as np

from .parts import PackedParts

__all__ = [
    "RejectReason",
    "DECODING_REASONS",
    "ProtocolError",
    "IgnoredMessage",
    "MainHeader",
    "ChannelSpec",
    "DataHeader",
    "DataHeaderCache",
    "PerHeader",
    "plain_text",
    "Message",
    "MessageParser",
    "parse_main_header",
    "parse_data_header",
    "decode_value",
    "decode_timestamp",
    "direct_chunk_compatible",
    "encode_value",
    "build_message",
    "COMPRESSIONS",
    "TYPES",
    "BITSHUFFLE_BLOCK_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
]

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
    #: ``global_timestamp`` not an object, or sec/ns of the wrong type or out of range.
    BAD_TIMESTAMP = "bad_timestamp"
    #: ``hash`` missing, empty or not a string.
    BAD_HASH = "bad_hash"
    #: Data header missing, not decompressible, not JSON, or a channel entry is malformed
    #: (name, shape, encoding, modulo, offset, duplicate names).
    DATA_HEADER_INVALID = "data_header_invalid"
    #: ``dh_compression`` or a channel's ``compression`` is not none/lz4/bitshuffle_lz4.
    UNKNOWN_COMPRESSION = "unknown_compression"
    #: A channel's ``type`` is not one of :data:`TYPES`.
    UNKNOWN_TYPE = "unknown_type"
    #: Number of parts is not 2 + 2 * number of channels.
    PART_COUNT = "part_count"
    #: The message is larger than the parser's ``max_message_bytes``.
    OVERSIZE = "oversize"
    #: No parts at all, or an empty main header part.
    EMPTY_MESSAGE = "empty_message"
    #: A value part does not decode to the header's type and shape (decoding only, never parse()).
    VALUE_INVALID = "value_invalid"
    #: A channel timestamp part is neither empty nor 16 bytes (decoding only, never parse()).
    CHANNEL_TIMESTAMP_INVALID = "channel_timestamp_invalid"

    def __str__(self) -> str:
        return self.value


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


# --------------------------------------------------------------------------- main header


@dataclass(frozen=True, slots=True)
class MainHeader:
    """Part 0 of a message, validated and with defaults applied."""

    htype: str
    pulse_id: int
    sec: int
    ns: int
    hash: str
    dh_compression: str = "none"

    @property
    def timestamp(self) -> float:
        """Global timestamp in seconds since the epoch (0.0 when the producer gave none)."""
        return self.sec + self.ns * 1e-9


def parse_main_header(frame: Frame) -> MainHeader:
    """Parse and validate part 0.

    Raises :class:`ProtocolError` for a malformed header and
    :class:`IgnoredMessage` for a control message. Lean on purpose: the
    buffer calls it for every message.
    """
    try:
        header = json.loads(_json_input(frame))
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
        raise ProtocolError(RejectReason.MAIN_HEADER_NOT_JSON,
                            f"main header is not JSON: {error}") from None
    if type(header) is not dict:
        raise ProtocolError(RejectReason.MAIN_HEADER_NOT_OBJECT,
                            f"main header is a JSON {type(header).__name__}, not an object")

    htype = header.get("htype")
    if type(htype) is not str:
        raise ProtocolError(RejectReason.BAD_HTYPE,
                            "main header has no htype" if htype is None
                            else f"htype {_short(htype)} is not a string")
    if not (htype.startswith("bsr_m-") or htype == "bsr_m"):
        raise IgnoredMessage(htype)

    pulse_id = header.get("pulse_id", 0)  # Java omits a pulse_id of 0
    if type(pulse_id) is not int:
        raise ProtocolError(RejectReason.BAD_PULSE_ID, f"pulse_id {_short(pulse_id)} is not an integer")
    if pulse_id < 0:
        raise ProtocolError(RejectReason.BAD_PULSE_ID, f"pulse_id {pulse_id} is negative")
    if pulse_id > _INT64_MAX:
        raise ProtocolError(RejectReason.BAD_PULSE_ID, f"pulse_id {_short(pulse_id)} does not fit in int64")

    stamp = header.get("global_timestamp")
    if stamp is None:
        sec = ns = 0
    elif type(stamp) is dict:
        sec = stamp.get("sec")
        if sec is None:
            sec = stamp.get("epoch", 0)  # old Python senders; Java omits 0
        ns = stamp.get("ns", 0)
        if type(sec) is not int or type(ns) is not int:
            raise ProtocolError(RejectReason.BAD_TIMESTAMP,
                                f"global_timestamp sec {_short(sec)} / ns {_short(ns)} are not integers")
        if not 0 <= sec <= _INT64_MAX:
            raise ProtocolError(RejectReason.BAD_TIMESTAMP, f"global_timestamp sec {_short(sec)} is out of range")
        if not 0 <= ns < _NS_PER_SECOND:
            raise ProtocolError(RejectReason.BAD_TIMESTAMP,
                                f"global_timestamp ns {_short(ns)} is not in [0, 1e9)")
    else:
        raise ProtocolError(RejectReason.BAD_TIMESTAMP,
                            f"global_timestamp {_short(stamp)} is not an object")

    data_hash = header.get("hash")
    if type(data_hash) is not str or not data_hash:
        raise ProtocolError(RejectReason.BAD_HASH,
                            "main header has no hash" if data_hash is None
                            else f"hash {_short(data_hash)} is not a non-empty string")

    dh_compression = header.get("dh_compression")
    if dh_compression is None:
        dh_compression = "none"
    elif type(dh_compression) is not str or dh_compression.lower() not in COMPRESSIONS:
        raise ProtocolError(RejectReason.UNKNOWN_COMPRESSION,
                            f"dh_compression {_short(dh_compression)} is not one of none, lz4, bitshuffle_lz4")
    else:
        dh_compression = dh_compression.lower()

    return MainHeader(htype, pulse_id, sec, ns, data_hash, dh_compression)


# --------------------------------------------------------------------------- data header


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


@dataclass(frozen=True, slots=True)
class DataHeader:
    """Part 1 of a message, parsed: the channel list in part order."""

    hash: str
    channels: tuple[ChannelSpec, ...]
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple(channel.name for channel in self.channels)
        index = {name: position for position, name in enumerate(names)}
        if len(index) != len(names):
            seen: set[str] = set()
            duplicates = sorted({name for name in names if name in seen or seen.add(name)})
            raise ProtocolError(RejectReason.DATA_HEADER_INVALID,
                                f"duplicate channel names: {', '.join(duplicates)}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "_index", index)

    def index_of(self, name: str) -> int:
        """Position of channel ``name`` (value part ``2 + 2 * i``). KeyError if absent."""
        return self._index[name]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def same_as(self, other: "DataHeader | None") -> bool:
        """The same channels as ``other``: the same object (the parser's cache hands out one per header),
        else equal contents.

        Never by hash alone: the hash is the sender's word, never checked, and
        a sender that changes its channels without a new hash gets its new bytes
        parsed into a new header (``DataHeaderCache``); a consumer comparing
        hashes would go on reading the new parts by the old positions.
        """
        return other is not None and (self is other or self == other)


_T = TypeVar("_T")


class PerHeader(Generic[_T]):
    """What a consumer derives from a data header (channel positions, a subset), made once per header.

    Keyed by the header object, as ``DataHeader.same_as`` compares first (the
    parser's cache hands out one object per header; never by hash: see there).
    Holds the headers it keys by, so no ``id`` is reused while its entry lives;
    at most ``max_entries`` (a source changing its header all the time: no growth).
    """

    def __init__(self, make: Callable[[DataHeader], _T], max_entries: int = 64) -> None:
        self._make = make
        self.max_entries = max_entries
        self._entries: dict[int, tuple[DataHeader, _T]] = {}

    def __call__(self, header: DataHeader) -> _T:
        entry = self._entries.get(id(header))
        if entry is not None and entry[0] is header:
            return entry[1]
        made = self._make(header)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[id(header)] = (header, made)
        return made


_DATA_HEADER_SPECS = {compression: ChannelSpec("data_header", "string", compression=compression)
                      for compression in COMPRESSIONS}


def parse_data_header(data_hash: str, frame: Frame, dh_compression: str = "none",
                      max_value_bytes: int | None = None) -> DataHeader:
    """Parse part 1 (uncached; use :class:`DataHeaderCache` in a stream).

    ``max_value_bytes`` (the message-size limit): an uncompressed channel
    that declares more bytes per value than this (no message can carry it),
    or a compressed one declaring more than LZ4's largest ratio could expand
    such a message to, makes the header invalid, so that no consumer sizes
    anything by it. A compressed value larger than the message is normal
    (a 2 MB image compressed into a 1 MB message).
    """
    spec = _DATA_HEADER_SPECS.get(dh_compression)
    if spec is None:
        raise ProtocolError(RejectReason.UNKNOWN_COMPRESSION,
                            f"dh_compression {_short(dh_compression)} is not one of none, lz4, bitshuffle_lz4")
    buffer = _as_buffer(frame)
    if _frame_size(buffer) == 0:
        raise ProtocolError(RejectReason.DATA_HEADER_INVALID, "data header part is empty")
    try:
        raw = _decompressed_bytes(spec, buffer)
    except ProtocolError as error:
        raise ProtocolError(RejectReason.DATA_HEADER_INVALID,
                            f"data header ({dh_compression}) does not decompress: {error.detail}") from None
    try:
        document = json.loads(_json_input(raw))
    except (ValueError, RecursionError) as error:
        raise ProtocolError(RejectReason.DATA_HEADER_INVALID, f"data header is not JSON: {error}") from None
    if type(document) is not dict:
        raise ProtocolError(RejectReason.DATA_HEADER_INVALID,
                            f"data header is a JSON {type(document).__name__}, not an object")
    entries = document.get("channels")
    if entries is None:
        entries = []  # Java omits an empty list
    if type(entries) is not list:
        raise ProtocolError(RejectReason.DATA_HEADER_INVALID,
                            f"data header channels {_short(entries)} is not a list")
    channels = []
    for position, entry in enumerate(entries):
        try:
            spec = ChannelSpec.from_header(entry)
        except ProtocolError as error:
            raise ProtocolError(error.reason, f"channel {position}: {error.detail}") from None
        if max_value_bytes is not None and spec.nbytes is not None:
            limit = max_value_bytes if spec.compression == "none" else max_value_bytes * _LZ4_MAX_RATIO
            if spec.nbytes > limit:
                raise ProtocolError(RejectReason.DATA_HEADER_INVALID,
                                    f"channel {position} {spec.name!r}: {spec.type} {list(spec.shape)} declares "
                                    f"{spec.nbytes} bytes per value, more than a message may have ({limit}"
                                    f"{'' if spec.compression == 'none' else ' decompressed'})")
        channels.append(spec)
    return DataHeader(data_hash, tuple(channels))


@dataclass(frozen=True, slots=True)
class _Failure:
    """A cached parse failure, valid only for the same bytes (length + CRC32)."""

    reason: RejectReason
    detail: str
    fingerprint: tuple[int, int]

    def error(self) -> ProtocolError:
        # A fresh exception each time: re-raising one object would grow its traceback.
        return ProtocolError(self.reason, self.detail)


def _fingerprint(frame: Frame) -> tuple[int, int]:
    buffer = _as_buffer(frame)
    return _frame_size(buffer), zlib.crc32(buffer)


class DataHeaderCache:
    """Parsed data headers by (hash, dh_compression), least recently used evicted first.

    The hash is a cache key, never verified, so a hit is only taken when the
    part's bytes equal the bytes parsed for it (a memcmp): a message whose
    data header is garbage under a known hash is parsed, and rejected, like
    any other, and a consumer that joins at it is never handed bytes it
    cannot parse. Failures are cached too (keyed additionally by the bytes'
    CRC32) so that a stream of identical bad messages costs one parse.
    """

    def __init__(self, max_entries: int = 64, max_value_bytes: int | None = None) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, not {max_entries}")
        self.max_entries = max_entries
        self.max_value_bytes = max_value_bytes
        self._entries: OrderedDict[tuple[str, str], tuple[DataHeader, bytes] | _Failure] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, data_hash: str, frame: Frame, dh_compression: str = "none") -> DataHeader:
        """The parsed header for ``data_hash``, parsing ``frame`` unless these very bytes were parsed.

        Raises :class:`ProtocolError` (every time) for a header that does not parse.
        """
        key = (data_hash, dh_compression)
        entry = self._entries.get(key)
        buffer = _as_buffer(frame)
        if entry is not None:
            if type(entry) is tuple:
                if entry[1] == buffer:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry[0]
            elif entry.fingerprint == _fingerprint(buffer):
                self._entries.move_to_end(key)
                self.hits += 1
                raise entry.error()
        self.misses += 1
        try:
            header = parse_data_header(data_hash, buffer, dh_compression, self.max_value_bytes)
            parsed: tuple[DataHeader, bytes] | _Failure = (header, bytes(buffer))
        except ProtocolError as error:
            parsed = _Failure(error.reason, error.detail, _fingerprint(buffer))
        self._entries[key] = parsed
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        if type(parsed) is _Failure:
            raise parsed.error()
        return parsed[0]

    def clear(self) -> None:
        self._entries.clear()


# --------------------------------------------------------------------------- message


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
        """True if channel ``i`` has data: an empty value part means "no data" whatever the timestamp."""
        self._check(i)
        return _frame_size(self.frames[2 + 2 * i]) > 0

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

        Else: absent, ``(0, 0)`` ("not given"), or a part that is not 16 bytes
        (the parser does not check timestamp parts; a malformed one costs the
        value its own time, never the value: what every consumer shows).
        """
        self._check(i)
        part = self.frames[3 + 2 * i]
        if _frame_size(part) != 16:
            return self.timestamp
        sec, ns = struct.unpack("<qq" if self.data_header.channels[i].encoding == "little" else ">qq",
                                _as_buffer(part))
        return sec + ns * 1e-9 if sec or ns else self.timestamp


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


# --------------------------------------------------------------------------- values


def _invalid(spec: ChannelSpec, detail: str) -> ProtocolError:
    return ProtocolError(RejectReason.VALUE_INVALID, f"channel {spec.name!r}: {detail}")


def _lz4_decompress(spec: ChannelSpec, buffer: bytes | bytearray | memoryview) -> bytes:
    """uint32 size (either byte order) + one raw LZ4 block -> bytes."""
    size = _frame_size(buffer)
    if size < 4:
        raise _invalid(spec, f"lz4 part has {size} bytes, less than its 4-byte size field")
    head = bytes(buffer[:4])
    little, big = int.from_bytes(head, "little"), int.from_bytes(head, "big")
    payload = buffer[4:]
    expected = spec.nbytes
    if expected is not None:
        if little == expected or big == expected:
            candidates = [expected]
        else:
            raise _invalid(spec, f"lz4 size field is {little} (little endian) or {big} (big endian), "
                                 f"expected {expected}")
    else:
        # Python writes little endian; C++ big; Java and Rust the channel's order.
        candidates = [big, little] if spec.encoding == "big" else [little, big]
    # lz4 allocates the claimed size before it looks at the data: refuse the impossible.
    bound = (size - 4) * _LZ4_MAX_RATIO + _LZ4_SLACK
    candidates = [candidate for candidate in dict.fromkeys(candidates) if candidate <= bound]
    if not candidates:
        raise _invalid(spec, f"lz4 size field {little}/{big} is impossible for {size - 4} compressed bytes")
    error_text = ""
    for candidate in candidates:
        if candidate == 0:
            if size == 4 or bytes(payload) == b"\x00":
                return b""
            continue
        try:
            data = lz4.block.decompress(payload, uncompressed_size=candidate)
        except lz4.block.LZ4BlockError as error:
            error_text = str(error)
            continue
        if len(data) == candidate:
            return data
        error_text = f"decompressed to {len(data)} bytes, size field says {candidate}"
    raise _invalid(spec, f"lz4 block does not decompress: {error_text}")


def _default_block_elements(itemsize: int) -> int:
    """bitshuffle's default block size (elements), as its HDF5 filter and bsread choose it."""
    block = (BITSHUFFLE_BLOCK_BYTES // itemsize) // _BSHUF_MULT * _BSHUF_MULT
    return max(block, _BSHUF_MIN_BLOCK)


def _bitshuffle_stream_fits(payload: Any, n_elements: int, itemsize: int, block_elements: int,
                            offset: int = 0) -> bool:
    """Walk the block structure: True if it exactly fills ``payload``.

    bitshuffle's decoder trusts each block's size field and reads past the
    input on a corrupt one (segfault), so this check must pass first.
    """
    if block_elements <= 0 or block_elements % _BSHUF_MULT:
        return False
    length = _frame_size(payload) - offset
    n_blocks = n_elements // block_elements + (1 if (n_elements % block_elements) >= _BSHUF_MULT else 0)
    leftover = (n_elements % _BSHUF_MULT) * itemsize  # copied raw after the blocks
    if 4 * n_blocks + leftover > length:
        return False
    position = _walk_blocks(payload, offset, n_blocks)
    return position >= 0 and position + leftover == length


def _walk_blocks_python(payload: Any, offset: int, n_blocks: int) -> int:
    """End of ``n_blocks`` size-prefixed blocks from ``offset`` (relative to it), or -1 when a size field or a
    block would lie past the end."""
    unpack = struct.Struct(">I").unpack_from
    length = _frame_size(payload) - offset
    position = 0
    for _ in range(n_blocks):
        if length - position < 4:
            return -1
        size = unpack(payload, offset + position)[0]
        if size > length - position - 4:
            return -1
        position += 4 + size
    return position


def _compiled_walk() -> Callable[[Any, int, int], int] | None:
    """The C block walk (``core/_blockwalk.c``) where it was built (tests/test_protocol.py runs both)."""
    try:
        from ._blockwalk import walk
    except ImportError:
        return None
    return walk


#: The block walk: compiled where built (~0.15 ms per camera image saved), else the Python loop.
_walk_blocks = _compiled_walk() or _walk_blocks_python
BLOCK_WALK = "compiled" if _walk_blocks is not _walk_blocks_python else "python"


def _bitshuffle_decompress(spec: ChannelSpec, buffer: bytes | bytearray | memoryview) -> np.ndarray:
    """bitshuffle_lz4 part -> array (uint8 1-D for strings, else spec dtype and array_shape)."""
    size = _frame_size(buffer)
    if size < 12:
        raise _invalid(spec, f"bitshuffle_lz4 part has {size} bytes, less than its 12-byte header")
    n_bytes, block_bytes = struct.unpack_from(">QI", buffer, 0)
    dtype = spec.dtype
    itemsize = dtype.itemsize
    if spec.is_string:
        bound = (size - 12) * _LZ4_MAX_RATIO + _LZ4_SLACK
        if n_bytes > bound:
            raise _invalid(spec, f"bitshuffle_lz4 byte count {n_bytes} is impossible for {size} bytes")
        shape: tuple[int, ...] = (n_bytes,)
        if n_bytes == 0:
            return np.empty(0, dtype)
    else:
        if n_bytes != spec.nbytes:
            raise _invalid(spec, f"bitshuffle_lz4 byte count is {n_bytes}, expected {spec.nbytes} "
                                 f"for {spec.type} shape {list(spec.shape)}")
        shape = spec.array_shape
    n_elements = n_bytes // itemsize
    # The block-size field is in bytes (current producers, HDF5 filter), or in
    # elements (Python producers before 2018); 0 would mean the default.
    candidates = []
    if block_bytes % itemsize == 0:
        candidates.append(block_bytes // itemsize)
    candidates.append(block_bytes)
    candidates.append(_default_block_elements(itemsize))
    payload = np.frombuffer(buffer, dtype=np.uint8, offset=12)
    for attempt, block_elements in enumerate(dict.fromkeys(candidates)):
        if not _bitshuffle_stream_fits(payload, n_elements, itemsize, block_elements):
            continue
        try:
            array = bitshuffle.decompress_lz4(payload, shape, dtype, block_elements)
        except (RuntimeError, ValueError):
            continue
        if attempt and logger.isEnabledFor(logging.DEBUG):
            logger.debug("channel %r: bitshuffle block-size field %d read as %d elements (legacy producer)",
                         spec.name, block_bytes, block_elements)
        return array
    raise _invalid(spec, f"bitshuffle_lz4 stream of {size - 12} bytes does not decode "
                         f"(block-size field {block_bytes}, {n_elements} elements)")


def _decompressed_bytes(spec: ChannelSpec, buffer: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    compression = spec.compression
    if compression == "none":
        return buffer
    if compression == "lz4":
        return _lz4_decompress(spec, buffer)
    return _bitshuffle_decompress(spec, buffer).tobytes()


def decode_value(spec: ChannelSpec, part: Frame) -> np.ndarray | str | None:
    """Decode one value part.

    Returns None for an empty part (no data), a ``str`` for string channels
    (UTF-8, undecodable bytes replaced by U+FFFD), otherwise a numpy array of
    exactly ``spec.array_shape`` (a scalar is shape ``(1,)``, never a numpy
    scalar) with the channel's byte order. Uncompressed values are read-only
    views on the part. Raises :class:`ProtocolError` (``value_invalid``)
    when the bytes do not match the header's type and shape.
    """
    buffer = _as_buffer(part)
    size = _frame_size(buffer)
    if size == 0:
        return None
    if spec.is_string:
        return bytes(_decompressed_bytes(spec, buffer)).decode("utf-8", errors="replace")
    compression = spec.compression
    if compression == "bitshuffle_lz4":
        return _bitshuffle_decompress(spec, buffer)
    if compression == "lz4":
        buffer = _lz4_decompress(spec, buffer)
        size = len(buffer)
    if size != spec.nbytes:
        raise _invalid(spec, f"value has {size} bytes, expected {spec.nbytes} "
                             f"for {spec.type} shape {list(spec.shape)}")
    array = np.frombuffer(buffer, dtype=spec.dtype)
    return array if len(spec.array_shape) == 1 else array.reshape(spec.array_shape)


def decode_timestamp(spec: ChannelSpec, part: Frame) -> tuple[int, int] | None:
    """(sec, ns) of a timestamp part in the channel's byte order; None when empty.

    Raises :class:`ProtocolError` (``channel_timestamp_invalid``) for any
    other length than 0 or 16.
    """
    buffer = _as_buffer(part)
    size = _frame_size(buffer)
    if size == 0:
        return None
    if size != 16:
        raise ProtocolError(RejectReason.CHANNEL_TIMESTAMP_INVALID,
                            f"channel {spec.name!r}: timestamp part has {size} bytes, expected 16")
    return struct.unpack("<qq" if spec.encoding == "little" else ">qq", buffer)


def direct_chunk_compatible(spec: ChannelSpec, part: Frame) -> bool:
    """True if ``part`` is, byte for byte, the chunk the HDF5 bitshuffle filter would store.

    Then a writer may store it with ``write_direct_chunk`` in a dataset with
    ``chunks=(1,) + spec.array_shape``, dtype ``spec.dtype`` and
    ``hdf5plugin.Bitshuffle(cname="lz4")`` as its only filter. Checks:
    numeric bitshuffle_lz4 channel, byte count == ``spec.nbytes``, block-size
    field == the filter's default (8192 bytes for every bsread type; legacy
    element counts fail), and a block structure that exactly fills the part
    (a corrupt chunk would crash every later reader).
    """
    if spec.compression != "bitshuffle_lz4" or spec.is_string:
        return False
    buffer = _as_buffer(part)
    if _frame_size(buffer) < 12:
        return False
    n_bytes, block_bytes = struct.unpack_from(">QI", buffer, 0)
    itemsize = spec.dtype.itemsize
    block_elements = _default_block_elements(itemsize)
    if n_bytes != spec.nbytes or block_bytes != block_elements * itemsize:
        return False
    return _bitshuffle_stream_fits(buffer, spec.n_elements, itemsize, block_elements, offset=12)


# --------------------------------------------------------------------------- building


def _compress(spec: ChannelSpec, array: np.ndarray) -> bytes:
    """Compress ``array`` (already in the channel's dtype) exactly like bsread's codecs."""
    raw = array.tobytes()
    if spec.compression == "none":
        return raw
    if spec.compression == "lz4":
        # Little-endian size, as bsread's Python LZ4.pack_data writes it.
        return struct.pack("<I", len(raw)) + lz4.block.compress(raw, store_size=False)
    itemsize = array.dtype.itemsize
    block_elements = _default_block_elements(itemsize)
    header = struct.pack(">QI", len(raw), block_elements * itemsize)
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype.kind == "b":
        flat = flat.view(np.uint8)
    return header + bitshuffle.compress_lz4(flat, block_elements).tobytes()


def encode_value(spec: ChannelSpec, value: Any) -> bytes:
    """One value part for ``spec``: b"" for None; raises ValueError on a size mismatch."""
    if value is None:
        return b""
    if spec.is_string:
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        return _compress(spec, np.frombuffer(data, dtype=np.uint8))
    array = np.asarray(value, dtype=spec.dtype)
    if array.size != spec.n_elements:
        raise ValueError(f"channel {spec.name!r}: value has {array.size} elements, "
                         f"the header says {spec.n_elements} (shape {list(spec.shape)})")
    if array.ndim > 1 and array.shape != spec.array_shape:
        raise ValueError(f"channel {spec.name!r}: value shape {array.shape} is not {spec.array_shape} "
                         f"(header shape {list(spec.shape)} reversed)")
    return _compress(spec, np.ascontiguousarray(array).reshape(spec.array_shape))


_Timestamp = Union[float, int, tuple[int, int]]


def _split_timestamp(timestamp: _Timestamp) -> tuple[int, int]:
    if isinstance(timestamp, tuple):
        sec, ns = timestamp
        return int(sec), int(ns)
    sec = math.floor(timestamp)
    ns = min(int(round((timestamp - sec) * _NS_PER_SECOND)), _NS_PER_SECOND - 1)
    return int(sec), ns


def build_message(pulse_id: int, channels: Sequence[ChannelSpec | Mapping[str, Any]], values: Sequence[Any],
                  timestamp: _Timestamp | None = None, dh_compression: str = "none",
                  channel_timestamps: Sequence[_Timestamp | None] | None = None,
                  htype: str = "bsr_m-1.1") -> list[bytes]:
    """Frames of one bsread message, as bsread's Sender would send them.

    ``channels`` are :class:`ChannelSpec` or data-header dicts; ``values``
    one per channel (None -> two empty parts). ``timestamp`` is seconds
    (float) or ``(sec, ns)``; None sends ``(0, 0)``, bsread's "not given"
    (the core reads no clock: a producer passes its own ``time.time()``). ``channel_timestamps`` default
    to the global timestamp. The data header is JSON, compressed per
    ``dh_compression`` like a string value, and ``hash`` is the MD5 hex of
    those exact bytes (bsread's ``Sender._create_data_header``).
    """
    specs = [spec if isinstance(spec, ChannelSpec) else ChannelSpec.from_header(dict(spec)) for spec in channels]
    if len(values) != len(specs):
        raise ValueError(f"{len(values)} values for {len(specs)} channels")
    if channel_timestamps is not None and len(channel_timestamps) != len(specs):
        raise ValueError(f"{len(channel_timestamps)} channel timestamps for {len(specs)} channels")
    if not _is_int(pulse_id) or not 0 <= pulse_id <= _INT64_MAX:
        raise ValueError(f"pulse_id {pulse_id!r} is not an int64 >= 0")
    dh_spec = _DATA_HEADER_SPECS.get(dh_compression)
    if dh_spec is None:
        raise ValueError(f"dh_compression {dh_compression!r} is not one of none, lz4, bitshuffle_lz4")
    sec, ns = _split_timestamp((0, 0) if timestamp is None else timestamp)

    data_header = json.dumps({"htype": "bsr_d-1.1", "channels": [spec.metadata() for spec in specs]})
    data_header_bytes = encode_value(dh_spec, data_header)
    main_header: dict[str, Any] = {"htype": htype, "pulse_id": pulse_id,
                                   "global_timestamp": {"sec": sec, "ns": ns},
                                   "hash": hashlib.md5(data_header_bytes).hexdigest()}
    if dh_compression != "none":
        main_header["dh_compression"] = dh_compression

    frames = [json.dumps(main_header).encode("utf-8"), data_header_bytes]
    for position, (spec, value) in enumerate(zip(specs, values)):
        if value is None:
            frames += (b"", b"")
            continue
        frames.append(encode_value(spec, value))
        stamp = channel_timestamps[position] if channel_timestamps is not None else None
        channel_sec, channel_ns = (sec, ns) if stamp is None else _split_timestamp(stamp)
        frames.append(struct.pack("<qq" if spec.encoding == "little" else ">qq", channel_sec, channel_ns))
    return frames
