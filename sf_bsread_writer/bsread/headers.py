"""bsread headers: the main header (part 0) and the data header (part 1), parsed and validated; their cache.

Pure. Data headers are parsed once per hash (:class:`DataHeaderCache`, LRU bounded): every message carries
its data header but a stream changes it rarely. The hash is a cache key only; consumers notice a change by
identity or contents (:meth:`DataHeader.same_as`), never by the hash alone. A header that fails to parse is
cached as a failure for the very same bytes, so a flood of identical bad messages costs one parse.
Producers' variants are accepted (defaults Java omits, ``{"epoch", "ns"}`` timestamps).
"""
from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sf_bsread_writer.bsread.codecs import _decompressed_bytes
from sf_bsread_writer.bsread.spec import (
    _INT64_MAX,
    _LZ4_MAX_RATIO,
    COMPRESSIONS,
    ChannelSpec,
    Frame,
    IgnoredMessage,
    ProtocolError,
    RejectReason,
    _as_buffer,
    _frame_size,
    _json_input,
    _short,
)
from sf_bsread_writer.bsread.timebase import plausible_stamp

__all__ = ["DataHeader", "DataHeaderCache", "MainHeader", "PerHeader", "parse_data_header", "parse_main_header"]


@dataclass(frozen=True, slots=True)
class MainHeader:
    """Part 0 of a message, validated and with defaults applied."""

    htype: str
    pulse_id: int
    sec: int
    ns: int
    hash: str
    dh_compression: str = "none"
    #: Why the sender's ``global_timestamp`` was replaced by "not given" (``sec = ns = 0``); "" when it was
    #: a time or absent. The buffer counts these and times the message by its receive time.
    timestamp_invalid: str = ""

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

    sec, ns, timestamp_invalid = _global_timestamp(header.get("global_timestamp"))

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

    return MainHeader(htype, pulse_id, sec, ns, data_hash, dh_compression, timestamp_invalid)


def _global_timestamp(stamp: Any) -> tuple[int, int, str]:
    """``(sec, ns, "")`` of a global timestamp, or ``(0, 0, why)`` when it is no time (the message is kept)."""
    if stamp is None:
        return 0, 0, ""
    if type(stamp) is not dict:
        return 0, 0, f"global_timestamp {_short(stamp)} is not an object"
    sec = stamp.get("sec")
    if sec is None:
        sec = stamp.get("epoch", 0)  # old Python senders; Java omits 0
    ns = stamp.get("ns", 0)
    if plausible_stamp(sec, ns):
        return sec, ns, ""
    if type(sec) is not int or type(ns) is not int:
        return 0, 0, f"global_timestamp sec {_short(sec)} / ns {_short(ns)} are not integers"
    return 0, 0, f"global_timestamp sec {_short(sec)} / ns {_short(ns)} is no time (implausible)"


@dataclass(frozen=True, slots=True)
class DataHeader:
    """Part 1 of a message, parsed: the channel list in part order."""

    hash: str
    channels: tuple[ChannelSpec, ...]
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    #: Positions of the refused channels (``ChannelSpec.refused``), in order; () for a header without any.
    refused: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple(channel.name for channel in self.channels)
        refused = tuple(position for position, channel in enumerate(self.channels) if channel.refused is not None)
        accepted = [(channel.name, position) for position, channel in enumerate(self.channels)
                    if channel.refused is None]
        index = dict(accepted)
        if len(index) != len(accepted):
            seen: set[str] = set()
            duplicates = sorted({name for name, _ in accepted if name in seen or seen.add(name)})
            raise ProtocolError(RejectReason.DATA_HEADER_INVALID,
                                f"duplicate channel names: {', '.join(duplicates)}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "refused", refused)
        object.__setattr__(self, "_index", index)

    def index_of(self, name: str) -> int:
        """Position of the accepted channel ``name`` (value part ``2 + 2 * i``). KeyError if absent or refused."""
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
    seen: set[str] = set()
    for position, entry in enumerate(entries):
        try:
            spec = _checked_channel(position, entry, max_value_bytes)
            if spec.name in seen:
                raise ProtocolError(RejectReason.DATA_HEADER_INVALID,
                                    f"channel {position}: duplicate channel name {_short(spec.name)} "
                                    "(the first of that name is kept)")
            seen.add(spec.name)
        except ProtocolError as error:  # that channel only: its place kept, its values never read
            spec = ChannelSpec.refusal(_entry_name(position, entry), error)
        channels.append(spec)
    return DataHeader(data_hash, tuple(channels))


def _entry_name(position: int, entry: Any) -> str:
    """The name a refused entry is known by: its own where it is one, else ``channel <position>``."""
    name = entry.get("name") if type(entry) is dict else None
    return name if type(name) is str and name else f"channel {position}"


def _checked_channel(position: int, entry: Any, max_value_bytes: int | None) -> ChannelSpec:
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
    return spec


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
