"""bsread values <-> bytes: LZ4 and bitshuffle/LZ4 (bounds-checked before the C library sees them), decoding.

Pure. ``bitshuffle.decompress_lz4`` trusts the block sizes inside the stream and segfaults on a corrupt
one, so the block structure is walked and checked here first (compiled in ``_blockwalk.c`` where built,
the same walk in Python otherwise). :func:`direct_chunk_compatible` tells the writer when a received
``bitshuffle_lz4`` part can be stored unchanged as an HDF5 chunk.

bitshuffle is imported on first use, not here: its wheel links OpenMP, which reads OMP_NUM_THREADS once, when
it loads, and a service sets that first thing in ``main()`` (``process.service_start``), after its modules (and
so this one) are imported.
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

import lz4.block
import numpy as np

from sf_bsread_writer.bsread.spec import (
    _BSHUF_MIN_BLOCK,
    _BSHUF_MULT,
    _LZ4_MAX_RATIO,
    _LZ4_SLACK,
    BITSHUFFLE_BLOCK_BYTES,
    ChannelSpec,
    Frame,
    ProtocolError,
    RejectReason,
    _as_buffer,
    _frame_size,
    logger,
)
from sf_bsread_writer.bsread.timebase import plausible_stamp

__all__ = ["BLOCK_WALK", "decode_timestamp", "decode_value", "direct_chunk_compatible", "value_problem"]


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
    """The C block walk (``bsread/_blockwalk.c``) where it was built (tests/test_protocol.py runs both)."""
    try:
        from sf_bsread_writer.bsread._blockwalk import walk
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
        import bitshuffle  # on first use (module docstring); later calls find it in sys.modules

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
    when the bytes do not match the header's type and shape, and the
    channel's refusal for a refused channel (whatever the part holds).
    """
    if spec.refused is not None:
        raise ProtocolError(spec.refused, spec.refused_detail)
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
    other length than 0 or 16, and for a stamp that is no time
    (``bsread.timebase.plausible_stamp``).
    """
    buffer = _as_buffer(part)
    size = _frame_size(buffer)
    if size == 0:
        return None
    if size != 16:
        raise ProtocolError(RejectReason.CHANNEL_TIMESTAMP_INVALID,
                            f"channel {spec.name!r}: timestamp part has {size} bytes, expected 16")
    sec, ns = struct.unpack("<qq" if spec.encoding == "little" else ">qq", buffer)
    if not plausible_stamp(sec, ns):
        raise ProtocolError(RejectReason.CHANNEL_TIMESTAMP_INVALID,
                            f"channel {spec.name!r}: timestamp sec {sec} / ns {ns} is no time (implausible)")
    return sec, ns


def value_problem(spec: ChannelSpec, part: Frame) -> ProtocolError | None:
    """Why a present value part cannot be stored, or None when it can: the check before anything is
    sized by the channel's header (a dataset, a buffer), so that only a value that decodes does that.

    A ``bitshuffle_lz4`` part that is a valid HDF5 chunk (:func:`direct_chunk_compatible`: byte count and
    block structure checked) is accepted without decompressing it; anything else is decoded once.
    """
    if spec.refused is not None:
        return ProtocolError(spec.refused, spec.refused_detail)
    if direct_chunk_compatible(spec, part):
        return None
    try:
        decode_value(spec, part)
    except ProtocolError as error:
        return error
    return None


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
    if spec.compression != "bitshuffle_lz4" or spec.is_string or spec.refused is not None:
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
