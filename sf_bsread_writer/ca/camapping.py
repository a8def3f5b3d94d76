"""How a bsread channel is shown as an EPICS Channel Access PV (pure, no I/O).

Channel Access has six value types (STRING, SHORT, FLOAT, ENUM, CHAR, LONG,
DOUBLE) and no 64-bit or unsigned integer. bsread has thirteen. The mapping
below is chosen so that **no value changes on the way**:

=========  ===============  ===============================================
bsread     CA native type   why
=========  ===============  ===============================================
bool       CHAR             0/1, an unsigned byte
int8       SHORT            CA CHAR is unsigned: -1 would read back as 255
uint8      CHAR             exact
int16      SHORT            exact
uint16     LONG             SHORT is signed: 65535 would read back as -1
int32      LONG             exact
uint32     DOUBLE           LONG is signed; every uint32 is exact in a double
int64      DOUBLE           CA has no 64-bit integer; an int64 put into a
uint64     DOUBLE           LONG read back as 0 in research runs. Exact up to
                            2**53 (pulse ids, counters); beyond, rounded
float32    FLOAT            exact
float64    DOUBLE           exact
string     STRING           up to 39 UTF-8 bytes (DBR_STRING is 40 bytes with
                            its terminator); a longer value turns the PV into
                            a CHAR array (an EPICS "long string", read it
                            with ``caget -S``) so that nothing is cut off
=========  ===============  ===============================================

A channel whose bsread shape is not ``[1]`` is a waveform of the element
type above, ``prod(shape)`` elements, flattened in bsread order (fastest
dimension first, which is numpy's C order of ``shape[::-1]``). Its numpy
shape (``shape[::-1]``, the shape of one row in the HDF5 file) is published
by the gateway as the extra PV ``<pv>:SHAPE``.

The gateway decides a PV's type from the data header alone (plus, for
strings, whether a long value has been seen), so a PV's type changes only
when the header does: then the PV is replaced and clients reconnect.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

__all__ = [
    "CaMapping",
    "CA_TYPE_BY_BSREAD_TYPE",
    "MAX_STRING_BYTES",
    "DEFAULT_LONG_STRING_BYTES",
    "map_channel",
    "to_ca_value",
    "fits_dbr_string",
    "UnknownTypeError",
    "IocRecord",
    "SEVERITY_NAMES",
    "SEVERITY_SUFFIX",
    "ioc_record_for",
    "record_holds",
    "widened",
    "record_to_json",
    "record_from_json",
    "ioc_value",
    "exact_text",
]

#: The companion channel of a bridged IOC PV ``X`` that carries its alarm severity: ``X.SEVR``
#: (the CA bridge sends it, the gateway serves it as ``X``'s severity; a record name cannot
#: hold ".", so it never collides with a PV's own channel). Values index SEVERITY_NAMES.
SEVERITY_SUFFIX = ".SEVR"
SEVERITY_NAMES = ("NO_ALARM", "MINOR", "MAJOR", "INVALID")

#: A DBR_STRING holds 40 bytes including the terminating NUL.
MAX_STRING_BYTES = 39

#: Longest text a long-string PV (CHAR array) holds; longer values are cut
#: and flagged with a MINOR alarm. Clients need EPICS_CA_MAX_ARRAY_BYTES
#: above this (the EPICS default, 16384, is).
DEFAULT_LONG_STRING_BYTES = 4096

#: bsread type -> CA native type name (see the table in the module docstring).
CA_TYPE_BY_BSREAD_TYPE: dict[str, str] = {
    "bool": "CHAR",
    "int8": "SHORT",
    "uint8": "CHAR",
    "int16": "SHORT",
    "uint16": "LONG",
    "int32": "LONG",
    "uint32": "DOUBLE",
    "int64": "DOUBLE",
    "uint64": "DOUBLE",
    "float32": "FLOAT",
    "float64": "DOUBLE",
    "string": "STRING",
}

# Native-endian numpy dtype that holds each CA type's values exactly.
_NUMPY_BY_CA_TYPE: dict[str, np.dtype] = {
    "CHAR": np.dtype(np.uint8),
    "SHORT": np.dtype(np.int16),
    "LONG": np.dtype(np.int32),
    "FLOAT": np.dtype(np.float32),
    "DOUBLE": np.dtype(np.float64),
}


class UnknownTypeError(ValueError):
    """The data header names a type that bsread does not define."""


@dataclass(frozen=True)
class CaMapping:
    """The CA side of one bsread channel.

    ``ca_type`` is a CA native type name ("DOUBLE", "FLOAT", "LONG", "SHORT",
    "CHAR", "STRING"); ``long_string`` marks a CHAR array that carries text.
    ``count`` is the element count (1 for scalars and STRING; the byte limit
    for long strings). ``shape`` is the numpy shape of one value (``()`` for
    scalars and strings). Two mappings that compare equal can share a PV.
    """

    bsread_type: str
    ca_type: str
    count: int
    shape: tuple[int, ...]
    long_string: bool = False

    @property
    def is_array(self) -> bool:
        """A waveform (published with a ``:SHAPE`` PV)."""
        return bool(self.shape)

    @property
    def numpy_dtype(self) -> np.dtype | None:
        """dtype of the values handed to the CA server (None for text)."""
        if self.ca_type == "STRING" or self.long_string:
            return None
        return _NUMPY_BY_CA_TYPE[self.ca_type]

    def describe(self) -> str:
        """One line for logs and docs, e.g. ``uint16 [1024, 1280] -> LONG[1310720]``."""
        if self.long_string:
            return f"{self.bsread_type} -> CHAR[{self.count}] (long string)"
        if self.is_array:
            return f"{self.bsread_type} {list(self.shape)} -> {self.ca_type}[{self.count}]"
        return f"{self.bsread_type} -> {self.ca_type}"


def map_channel(bsread_type: str, shape: Sequence[int] = (1,), *, long_string: bool = False,
                long_string_bytes: int = DEFAULT_LONG_STRING_BYTES) -> CaMapping:
    """The CA mapping of a bsread channel of ``bsread_type`` and header ``shape`` (fastest first).

    ``long_string`` asks for the CHAR-array form of a string channel (the
    gateway sets it once a value over 39 bytes has been seen).
    """
    try:
        ca_type = CA_TYPE_BY_BSREAD_TYPE[bsread_type]
    except KeyError:
        raise UnknownTypeError(f"unknown bsread type {bsread_type!r}") from None
    if ca_type == "STRING":
        if long_string:
            return CaMapping(bsread_type, "CHAR", long_string_bytes, (), long_string=True)
        return CaMapping(bsread_type, "STRING", 1, ())
    header_shape = tuple(int(n) for n in shape) or (1,)
    if header_shape == (1,):
        return CaMapping(bsread_type, ca_type, 1, ())
    numpy_shape = header_shape[::-1]
    return CaMapping(bsread_type, ca_type, max(1, math.prod(numpy_shape)), numpy_shape)


def fits_dbr_string(text: str) -> bool:
    """Whether ``text`` fits a DBR_STRING unchanged (39 UTF-8 bytes)."""
    return len(text) <= MAX_STRING_BYTES and len(text.encode("utf-8")) <= MAX_STRING_BYTES


def to_ca_value(mapping: CaMapping, value: Any) -> tuple[Any, bool]:
    """Convert a decoded bsread value to what the CA server stores for ``mapping``.

    Returns ``(ca_value, truncated)``. Numbers come back as a Python scalar
    (scalar PVs) or a 1-D contiguous array of the CA type's numpy dtype
    (waveforms, flattened in C order of the numpy shape); text as ``str``
    (STRING) or ``bytes`` (long string). ``truncated`` is True only when a
    text was longer than the PV can hold (the caller flags an alarm, or, for
    a STRING PV, switches to the long-string form first).
    """
    if mapping.ca_type == "STRING" or mapping.long_string:
        text = value if isinstance(value, str) else _as_text(value)
        if mapping.long_string:
            data = text.encode("utf-8")
            if len(data) > mapping.count:
                return data[: mapping.count], True
            return data, False
        if not fits_dbr_string(text):
            return _cut_utf8(text, MAX_STRING_BYTES), True
        return text, False
    dtype = _NUMPY_BY_CA_TYPE[mapping.ca_type]
    array = np.asarray(value)
    if mapping.is_array:
        flat = np.ascontiguousarray(array.reshape(-1), dtype=dtype)
        return flat, False
    scalar = array.reshape(-1)[0] if array.size else 0
    if dtype.kind == "f":
        return float(scalar), False
    return int(scalar), False


def _as_text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SU":
        return str(value.reshape(-1)[0])
    return str(value)


def _cut_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 form fits ``max_bytes`` (no broken character)."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


# ---------------------------------------------------------------------------
# EPICS records (the gateway on pythonSoftIOC: ca/ioc.py)
# ---------------------------------------------------------------------------
#: Waveform element type (FTVL) per bsread type, chosen so that EPICS base
#: tools show every value exactly and with its sign: CA has no unsigned
#: 16/32-bit types, and only UCHAR arrays read unsigned in caget.
FTVL_BY_BSREAD_TYPE: dict[str, str] = {
    "bool": "UCHAR", "uint8": "UCHAR", "int8": "SHORT", "int16": "SHORT", "uint16": "LONG", "int32": "LONG",
    "uint32": "DOUBLE", "int64": "DOUBLE", "uint64": "DOUBLE", "float32": "FLOAT", "float64": "DOUBLE",
}
NUMPY_BY_FTVL: dict[str, np.dtype] = {
    "UCHAR": np.dtype(np.uint8), "SHORT": np.dtype(np.int16), "LONG": np.dtype(np.int32),
    "FLOAT": np.dtype(np.float32), "DOUBLE": np.dtype(np.float64),
}
#: Display precision (PREC) of floating-point scalars: a display shows 0.86, not 1.
FLOAT_PRECISION = {"float32": 4, "float64": 6}
#: The record's DESC field holds 40 bytes with its terminator.
MAX_DESC_BYTES = 39


@dataclass(frozen=True)
class IocRecord:
    """The EPICS record that serves one bsread channel (pure decision; ``ca/ioc.py`` builds it).

    ``kind``: ``ai`` (DOUBLE), ``longin`` (LONG), ``mbbi`` (ENUM: an integer
    channel whose data header names its states, ``enum_strings``),
    ``stringin`` (DBR_STRING, 39 bytes), ``lsi`` (a long string: a CHAR array
    of ``length`` bytes, read it with ``caget -S``; a channel becomes one once
    a longer value was seen) or ``waveform`` (``ftvl`` elements, ``length`` of
    them). ``exact_text``: also served as ``<pv>_STR``, a string of the exact
    value (64-bit integers, which a DOUBLE holds exactly only up to 2**53).
    ``unit``, ``description`` and ``precision`` come from the data header's
    display metadata when it has them (the CA bridge sends the IOC's). Two
    channels with equal records can share one without restarting the IOC.
    """

    bsread_type: str
    kind: str
    length: int = 1
    ftvl: str | None = None
    precision: int = 0
    exact_text: bool = False
    shape: tuple[int, ...] = ()  # numpy shape of one value (waveforms)
    unit: str = ""  # EGU
    description: str = ""  # DESC ("" = the channel name)
    enum_strings: tuple[str, ...] = ()  # mbbi states ZRST..FFST

    @property
    def numpy_dtype(self) -> np.dtype | None:
        if self.kind == "waveform":
            return NUMPY_BY_FTVL[self.ftvl or "DOUBLE"]
        return None


def ioc_record_for(bsread_type: str, shape: Sequence[int] = (1,), *, long_string: bool = False,
                   long_string_bytes: int = DEFAULT_LONG_STRING_BYTES,
                   display: Sequence[tuple[str, Any]] = ()) -> IocRecord:
    """The record for a channel of ``bsread_type`` and header ``shape`` (fastest first); see :class:`IocRecord`.

    ``display``: the channel's data-header display metadata (``ChannelSpec.display``).
    """
    if bsread_type not in CA_TYPE_BY_BSREAD_TYPE:
        raise UnknownTypeError(f"unknown bsread type {bsread_type!r}")
    meta = dict(display)
    described = {"unit": _fit(meta.get("unit", ""), MAX_EGU_BYTES),
                 "description": _fit(meta.get("description", ""), MAX_DESC_BYTES)}
    if bsread_type == "string":
        return IocRecord(bsread_type, "lsi", long_string_bytes, **described) if long_string \
            else IocRecord(bsread_type, "stringin", MAX_STRING_BYTES + 1, **described)
    header_shape = tuple(int(n) for n in shape) or (1,)
    if header_shape != (1,):
        numpy_shape = header_shape[::-1]
        return IocRecord(bsread_type, "waveform", max(1, math.prod(numpy_shape)), FTVL_BY_BSREAD_TYPE[bsread_type],
                         shape=numpy_shape, precision=meta.get("precision", FLOAT_PRECISION.get(bsread_type, 0)),
                         **described)
    if bsread_type in FLOAT_PRECISION:
        return IocRecord(bsread_type, "ai", precision=meta.get("precision", FLOAT_PRECISION[bsread_type]),
                         **described)
    if bsread_type in ("uint32", "int64", "uint64"):
        return IocRecord(bsread_type, "ai", precision=0, exact_text=bsread_type != "uint32", **described)
    states = meta.get("enum_strings", ())
    if states and len(states) <= MAX_ENUM_STATES:
        return IocRecord(bsread_type, "mbbi", enum_strings=tuple(_fit(state, MAX_ENUM_STATE_BYTES)
                                                                 for state in states), **described)
    return IocRecord(bsread_type, "longin", **described)


#: An mbbi record has 16 states (ZRST..FFST) of 26 bytes with the terminator; EGU 16 bytes.
MAX_ENUM_STATES = 16
MAX_ENUM_STATE_BYTES = 25
MAX_EGU_BYTES = 15


def _fit(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes (a record field's size) at a character boundary."""
    return _cut_utf8(text, limit) if len(text.encode("utf-8")) > limit else text


def ioc_value(record: IocRecord, value: Any) -> tuple[Any, bool]:
    """A decoded bsread value as the record takes it; ``(value, truncated)`` (see :func:`to_ca_value`).

    ai: float; longin: int; lsi: str (cut to the record's length in UTF-8
    bytes, truncated=True); waveform: a 1-D array of the FTVL's dtype (an
    empty array is fine: NORD 0).
    """
    if record.kind in ("lsi", "stringin"):
        text = value if isinstance(value, str) else _as_text(value)
        if len(text.encode("utf-8")) > record.length - 1:
            return _cut_utf8(text, record.length - 1), True
        return text, False
    array = np.asarray(value)
    if record.kind == "waveform":
        flat = array.reshape(-1)
        if flat.size > record.length:
            return np.ascontiguousarray(flat[:record.length], dtype=record.numpy_dtype), True
        return np.ascontiguousarray(flat, dtype=record.numpy_dtype), False
    scalar = array.reshape(-1)[0] if array.size else 0
    if record.kind == "ai":
        return float(scalar), False
    return int(scalar), False


def exact_text(value: Any) -> str:
    """The exact decimal text of a value (the ``_STR`` twin of a 64-bit channel; a float, which
    such a twin shows after its channel was retyped, as Python's shortest exact repr)."""
    array = np.asarray(value).reshape(-1)
    if not array.size:
        return ""
    return repr(float(array[0])) if array.dtype.kind == "f" else str(int(array[0]))


# --------------------------------------------------------------------------
# A retyped channel: serve it on, or restart the IOC once with a record for both types
# --------------------------------------------------------------------------
_NUMERIC_SCALAR_KINDS = frozenset({"ai", "longin", "mbbi"})


def record_holds(served: IocRecord, wanted: IocRecord) -> bool:
    """True when the record ``served`` shows every value of a channel that needs ``wanted`` exactly, with
    the meaning it had (an mbbi's states): the IOC serves the channel on and no client is disconnected.

    Why it matters: a client learns a PV's native type when it connects, so a record that cannot
    hold the new type costs an IOC restart, and a connected libca client waits up to 10 s (its
    "disconnect governor", EPICS base ``disconnectGovernorTimer.cpp``) before it searches again.
    Units, DESC and precision do not count: they are set on the running record.
    """
    if "mbbi" in (served.kind, wanted.kind):
        return served.kind == wanted.kind and served.enum_strings == wanted.enum_strings
    if served.kind == "ai":  # a DOUBLE holds every integer up to 32 bits exactly
        return wanted.kind in ("ai", "longin") and (served.exact_text or not wanted.exact_text)
    if served.kind in ("longin", "stringin"):
        return wanted.kind == served.kind
    if served.kind == "lsi":
        return wanted.kind in ("stringin", "lsi") and served.length >= wanted.length
    return (wanted.kind == "waveform" and served.length >= wanted.length
            and len(served.shape) == len(wanted.shape)
            and bool(np.can_cast(wanted.numpy_dtype, served.numpy_dtype, "safe")))


def widened(previous: IocRecord, new: IocRecord) -> IocRecord:
    """The record for a channel that was served by ``previous`` and now needs ``new``.

    One that holds both where there is one, so that a channel flipping between two types (bsread's
    Python Sender makes the header of an absent value float64 [1]) restarts the IOC once, not at
    every flip: integer and float scalars -> ai, waveforms -> the wider element type and the
    longer length, strings -> a long string. Else (a number became a string, a scalar an array,
    an mbbi changed its states) ``new``. Units, DESC and precision are the new header's.
    """
    labels = {"unit": new.unit, "description": new.description}
    if record_holds(new, previous):
        return new
    if record_holds(previous, new):
        return replace(previous, shape=new.shape, precision=new.precision, **labels)
    kinds = {previous.kind, new.kind}
    if kinds <= _NUMERIC_SCALAR_KINDS:
        return IocRecord(new.bsread_type, "ai", precision=max(previous.precision, new.precision),
                         exact_text=previous.exact_text or new.exact_text, **labels)
    if kinds <= {"stringin", "lsi"}:
        return IocRecord(new.bsread_type, "lsi", max(previous.length, new.length), **labels)
    if kinds == {"waveform"} and len(previous.shape) == len(new.shape):
        dtype = np.promote_types(previous.numpy_dtype, new.numpy_dtype)
        ftvl = next((name for name, held in NUMPY_BY_FTVL.items() if held == dtype), "DOUBLE")
        return IocRecord(new.bsread_type, "waveform", max(previous.length, new.length), ftvl,
                         precision=max(previous.precision, new.precision), shape=new.shape, **labels)
    return new


def record_to_json(record: IocRecord) -> dict[str, Any]:
    """A JSON-able form of ``record`` (the gateway keeps its records across IOC restarts in a file)."""
    return asdict(record)


def record_from_json(data: Mapping[str, Any]) -> IocRecord:
    """The record of :func:`record_to_json`; raises ValueError/TypeError on anything else."""
    known = {field.name for field in fields(IocRecord)}
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items() if key in known}
    record = IocRecord(**values)
    if record.kind not in ("ai", "longin", "mbbi", "stringin", "lsi", "waveform"):
        raise ValueError(f"unknown record kind {record.kind!r}")
    return record
