"""The SwissFEL file layout as a contract: names, attributes, types and chunk shapes.

What a reader of the files relies on (docs/file-format.md is their
reference) and what the storage classes (``h5.columns``) and the file
(``h5.file``) build: the four ``/general`` fields, the file attributes, the
``/missing`` table's type, how a channel's (type, shape) decides its
dataset, and the chunking rule. The module docstring of ``h5.file`` says
why the file is written the way it is.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any
from urllib.parse import unquote

import h5py
import numpy as np

from sf_bsread_writer.bsread.spec import ChannelSpec, plain_text

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GENERAL_FIELDS",
    "NOT_GIVEN",
    "VARIANT_SEPARATOR",
    "OWN_ATTRIBUTES",
    "CALLER_ATTRIBUTES",
    "FILE_ATTRIBUTES",
    "TARGET_CHUNK_BYTES",
    "MAX_CHUNK_ROWS",
    "MAX_CHUNK_BYTES",
    "DIRECT_CHUNK_MIN_BYTES",
    "STRING_DTYPE",
    "MISSING_DTYPE",
    "TIMESTAMP_BYTES",
    "ABSENT_TIMESTAMP",
    "NS_PER_S",
    "chunk_shape",
    "channel_signature",
    "attribute_value",
    "fixed_string",
    "channel_group_name",
    "channel_of_group",
    "storable",
    "storable_text",
]

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
                  "rows_removed_after_stop", "refused_channels")
CALLER_ATTRIBUTES = ("requested_start_pulse_id", "requested_stop_pulse_id", "requested_start_time",
                     "requested_stop_time", "end_reason", "unlocated_gaps", "outcome", "time_base", "pulse_sources")
FILE_ATTRIBUTES = OWN_ATTRIBUTES + CALLER_ATTRIBUTES

# Chunking of buffered datasets: about TARGET_CHUNK_BYTES per chunk, never
# more than MAX_CHUNK_ROWS rows (a chunk is allocated whole on disk even if
# the run is short), and never a chunk near HDF5's 4 GiB limit.
TARGET_CHUNK_BYTES = 1024 * 1024
MAX_CHUNK_ROWS = 1024
MAX_CHUNK_BYTES = 256 * 1024 * 1024

# A bitshuffle_lz4 array smaller than this is decoded and buffered instead
# of stored as one chunk per row (tiny chunks make a huge chunk index).
DIRECT_CHUNK_MIN_BYTES = 4096

STRING_DTYPE = h5py.string_dtype("utf-8")
TIMESTAMP_BYTES = 16  # bsread timestamp part: int64 sec + int64 ns
ABSENT_TIMESTAMP = bytes(TIMESTAMP_BYTES)
NS_PER_S = 1_000_000_000


MISSING_DTYPE = np.dtype([
    ("first_pulse_id", "<i8"),
    ("last_pulse_id", "<i8"),
    ("count", "<i8"),
    ("reason", STRING_DTYPE),
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


def channel_signature(spec: ChannelSpec) -> tuple[str, tuple[int, ...]]:
    """What must stay equal for values to share one dataset: type and shape.

    Byte order and compression are not part of it: a value can be converted
    to the dataset's byte order and decompressed without loss.
    """
    if spec.is_string:
        return ("string", ())
    return (spec.type, tuple(spec.array_shape))


def attribute_value(value: Any) -> Any:
    """An HDF5-storable attribute value: int lists as int64 arrays, string lists as vlen UTF-8
    string arrays (h5py reads them back as a list-like array of str), other lists/dicts as JSON text."""
    if isinstance(value, (bool, np.bool_)):
        return np.uint8(value)
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        return np.array(value, dtype="<i8")
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return np.array(value, dtype=h5py.string_dtype())
    if isinstance(value, (int, float, str, np.integer, np.floating, np.ndarray, bytes)):
        return value
    return json.dumps(value, default=str)


def fixed_string(text: str) -> np.bytes_ | np.ndarray:
    """A fixed-length byte string scalar (the original's /general type); never S0."""
    encoded = text.encode("utf-8")
    if not encoded:
        return np.array(b"", dtype="S1")
    return np.bytes_(encoded)


# ---------------------------------------------------------------------------
# Channel names are data
# ---------------------------------------------------------------------------
# Characters that cannot stand in an HDF5 link name as they are: "/" makes a
# path, "%" is the escape itself, "@" separates a variant group's number
# (X@2) so that no channel name can be taken for one, control characters
# and lone surrogates are not storable text. "." and ".." are escaped only
# as whole names.
_UNSAFE = re.compile(r"[%/@\x00-\x1f\x7f\ud800-\udfff]")


def channel_group_name(name: str) -> str:
    """The name of a channel's group under ``/data``: the channel name, with unsafe characters escaped.

    Escaping is percent-encoding of the character's UTF-8 bytes (lone
    surrogates by their surrogate bytes), as in a URL: ``X:A/pulse_id`` is
    the group ``X:A%2Fpulse_id``, ``100%`` is ``100%25``, ``X@2`` is
    ``X%402`` (never a variant group's name), a NUL is ``%00``;
    the whole names ``.`` and ``..`` are ``%2E`` and ``%2E%2E``. Every
    other name, including any non-ASCII text, is the group name as it is.
    The mapping is one to one: :func:`channel_of_group` inverts it, and
    the group's attribute ``name`` holds the channel name.
    """
    if name in (".", ".."):
        return "%2E" * len(name)
    return _UNSAFE.sub(lambda match: "".join(f"%{byte:02X}" for byte in
                                             match.group().encode("utf-8", "surrogatepass")), name)


def channel_of_group(group_name: str) -> str:
    """The channel name of a group under ``/data`` (the inverse of :func:`channel_group_name`)."""
    return unquote(group_name, encoding="utf-8", errors="surrogatepass")


#: ``text`` as an HDF5 string attribute keeps it: lone surrogates and NUL (which ends a C string) become U+FFFD.
storable_text = plain_text


def storable(value: Any) -> Any:
    """A sender's attribute value with every text in it made storable (:func:`storable_text`): a name, a
    unit or description, each enum label. Anything else as it is."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, (list, tuple)):
        return [storable_text(item) if isinstance(item, str) else item for item in value]
    return value

