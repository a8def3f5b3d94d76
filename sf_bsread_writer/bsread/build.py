"""bsread messages from values: what bsread's own ``Sender`` would send (the simulator, the CA bridge, tests).

Pure: values in, frames out. bitshuffle is imported on first use (see ``codecs``: OpenMP reads
OMP_NUM_THREADS when it loads, and a service sets it in ``main()``, after its imports).
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import lz4.block
import numpy as np

from sf_bsread_writer.bsread.codecs import _default_block_elements
from sf_bsread_writer.bsread.headers import _DATA_HEADER_SPECS
from sf_bsread_writer.bsread.spec import (
    _INT64_MAX,
    _NS_PER_SECOND,
    ChannelSpec,
    _is_int,
    _Timestamp,
)

__all__ = ["build_message", "encode_value"]


def _compress(spec: ChannelSpec, array: np.ndarray) -> bytes:
    """Compress ``array`` (already in the channel's dtype) exactly like bsread's codecs."""
    raw = array.tobytes()
    if spec.compression == "none":
        return raw
    if spec.compression == "lz4":
        # Little-endian size, as bsread's Python LZ4.pack_data writes it.
        return struct.pack("<I", len(raw)) + lz4.block.compress(raw, store_size=False)
    import bitshuffle  # on first use (module docstring)

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
