"""Tests of the pure protocol core (sf_bsread_writer.bsread.message).

Independent references: bsread's own Sender (over a real ZeroMQ socket, and
captured in-process for the full type x compression matrix), bsread's value
readers, and the HDF5 bitshuffle filter (h5py + hdf5plugin) for the
direct-chunk byte equality.
"""
from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

import bitshuffle
import bsread
import h5py
import hdf5plugin
import lz4.block
import numpy as np
import pytest
import zmq
from bsread.data.compression import LZ4, BitshuffleLZ4
from bsread.data.helpers import get_channel_reader, get_value_bytes, get_value_reader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sf_bsread_writer.bsread.build import build_message, encode_value
from sf_bsread_writer.bsread.codecs import (
    decode_timestamp,
    decode_value,
    direct_chunk_compatible,
)
from sf_bsread_writer.bsread.headers import (
    DataHeader,
    DataHeaderCache,
    parse_main_header,
)
from sf_bsread_writer.bsread.message import Message, MessageParser
from sf_bsread_writer.bsread.spec import (
    ChannelSpec,
    IgnoredMessage,
    ProtocolError,
    RejectReason,
)
from tests.helpers import free_port

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

COMPRESSIONS = (None, "lz4", "bitshuffle_lz4")


# --------------------------------------------------------------------------- reference values

def sample_values() -> dict[str, Any]:
    """One value per bsread type and layout a producer can send, as bsread's Sender infers them."""
    rng = np.random.default_rng(12345)
    values: dict[str, Any] = {
        "py_bool": True,
        "py_int": -(2 ** 40),
        "py_float": 3.25,
        "py_string": "héllo wörld ✓",
        "empty_string": "",
        "absent": None,
        "np_bool": np.bool_(True),
        "bool_array": np.array([True, False, True, True, False, False, True, False, True]),
        "one_element_int16": np.array([-7], dtype=np.int16),
        "one_element_big_f8": np.array([1.5], dtype=">f8"),
        "row_1xn": np.arange(5, dtype=np.int32).reshape(1, 5),  # bsread loses the first axis
        "image_u16": rng.integers(0, 4096, size=(24, 40), dtype=np.uint16),  # shape [40, 24]
        "image_big_i4": rng.integers(-10 ** 6, 10 ** 6, size=(3, 5)).astype(">i4"),
        "wave_big_f8": rng.normal(size=1003).astype(">f8"),
        "cube_f4": rng.normal(size=(2, 3, 4)).astype(np.float32),
    }
    for name in ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                 "float32", "float64"):
        dtype = np.dtype(name)
        info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)
        values[f"scalar_{name}"] = dtype.type(info.max)
        values[f"array_{name}"] = np.array([info.min, 0, info.max, 1, 2, 3, 4, 5, 6, 7, 8], dtype=dtype)
        values[f"big_{name}"] = np.array([info.min, 1, info.max], dtype=dtype.newbyteorder(">"))
    return values


def sent_as_empty_part(original: Any, compression: str) -> bool:
    """None, and an uncompressed empty string, travel as an empty value part ("no data").

    A compressed empty string is a non-empty part (size field 0): a present "".
    """
    return original is None or isinstance(original, str) and original == "" and compression == "none"


def assert_decoded_equals(original: Any, decoded: Any, compression: str = "none") -> None:
    """Our decoding of a value sent by bsread is exactly the original (shape (1,) for scalars)."""
    if sent_as_empty_part(original, compression):
        assert decoded is None  # an empty part means "no data"
        return
    if isinstance(original, str):
        assert decoded == original
        return
    expected = np.asarray(original)
    if isinstance(original, bool):
        expected = expected.astype(bool)
    elif isinstance(original, int):
        expected = expected.astype(np.int64)
    elif isinstance(original, float):
        expected = expected.astype(np.float64)
    if expected.ndim == 0:
        expected = expected.reshape(1)
    assert isinstance(decoded, np.ndarray)
    assert decoded.shape == expected.shape
    assert decoded.dtype == expected.dtype  # includes the byte order
    assert decoded.tobytes() == expected.tobytes()


class CapturedStream:
    """Stands in for mflow's stream: records the parts bsread's Sender sends."""

    def __init__(self) -> None:
        self.messages: list[list[bytes]] = []
        self._current: list[bytes] = []

    def send(self, part: Any, send_more: bool = False, block: bool = True) -> None:
        self._current.append(bytes(part))
        if not send_more:
            self.messages.append(self._current)
            self._current = []

    def disconnect(self) -> None:
        pass


def capture_sender(monkeypatch: pytest.MonkeyPatch, sends: Sequence[dict[str, Any]],
                   data_compression: str | None, dh_compression: str | None) -> list[list[bytes]]:
    """Frames exactly as bsread's Sender builds them, without a socket."""
    stream = CapturedStream()
    # (``bsread.sender`` the attribute is a deprecated function shadowing the module)
    monkeypatch.setattr(sys.modules["bsread.sender"].mflow, "connect", lambda *args, **kwargs: stream)
    sender = bsread.Sender(data_compression=data_compression, data_header_compression=dh_compression)
    sender.open()
    for number, data in enumerate(sends):
        sender.send(data=data, pulse_id=1000 + number, timestamp=(1_700_000_000 + number, 123_456_789))
    sender.close()
    return stream.messages


def bsread_reader(spec: ChannelSpec) -> Callable[[bytes], Any]:
    """bsread's own value reader for a channel (as its compact handler builds it)."""
    channel = dict(spec.metadata())
    channel["encoding"] = ">" if spec.encoding == "big" else "<"
    return get_channel_reader(channel)


def check_message_against_originals(message: Message, values: dict[str, Any]) -> None:
    assert message.data_header.names == tuple(values)
    for index, (name, original) in enumerate(values.items()):
        spec = message.data_header.channels[index]
        decoded = message.value(index)
        assert_decoded_equals(original, decoded, spec.compression)
        present = not sent_as_empty_part(original, spec.compression)
        assert message.is_present(index) is present, name
        if original is None:
            assert message.channel_timestamp(index) is None
        else:
            assert message.channel_timestamp(index) == (message.main.sec, message.main.ns)
        if present:
            # bsread's own decoder agrees (modulo its scalar / lost-axis quirks).
            theirs = bsread_reader(spec)(bytes(message.value_part(index)))
            if spec.is_string:
                # bsread fails on a compressed empty string (logs a traceback, gives None).
                assert theirs == decoded or (decoded == "" and theirs is None)
            else:
                # (bsread turns a 1-element array into a native-order scalar: compare values)
                assert np.array_equal(np.asarray(theirs).reshape(-1), decoded.reshape(-1))


# --------------------------------------------------------------------------- real frames from bsread

@pytest.mark.parametrize("data_compression, dh_compression",
                         [(None, None), ("lz4", "bitshuffle_lz4"), ("bitshuffle_lz4", "lz4")])
def test_frames_from_bsread_sender_over_a_real_socket(data_compression: str | None,
                                                      dh_compression: str | None) -> None:
    values = sample_values()
    port = free_port()
    sender = bsread.Sender(port=port, address="tcp://127.0.0.1", mode=bsread.PUSH, queue_size=10,
                           data_compression=data_compression, data_header_compression=dh_compression,
                           send_timeout=5000)
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    sender.open()
    try:
        pull.connect(f"tcp://127.0.0.1:{port}")
        sender.send(data=values, pulse_id=17_000_000_000, timestamp=(1_700_000_000, 5))
        sender.send(data=values, pulse_id=17_000_000_001, timestamp=(1_700_000_000, 10_000_005))
        assert pull.poll(10_000), "no message from bsread's Sender"
        first = pull.recv_multipart(copy=False)  # zmq.Frame parts, as the buffer receives them
        assert pull.poll(10_000)
        second = pull.recv_multipart(copy=True)
    finally:
        sender.close()
        pull.close()
        context.term()

    parser = MessageParser()
    message = parser.parse(first)
    assert (message.pulse_id, message.main.sec, message.main.ns) == (17_000_000_000, 1_700_000_000, 5)
    assert message.main.dh_compression == (dh_compression or "none")
    assert message.n_channels == len(values)
    assert message.nbytes == sum(len(frame) for frame in first)
    check_message_against_originals(message, values)
    again = parser.parse(second)
    assert again.data_header is message.data_header  # parsed once per hash
    assert (parser.cache.hits, parser.cache.misses) == (1, 1)
    assert again.timestamp == pytest.approx(1_700_000_000.010000005)
    check_message_against_originals(again, values)


@pytest.mark.parametrize("dh_compression", COMPRESSIONS)
@pytest.mark.parametrize("data_compression", COMPRESSIONS)
def test_every_type_and_compression_from_bsread_sender(monkeypatch: pytest.MonkeyPatch,
                                                       data_compression: str | None,
                                                       dh_compression: str | None) -> None:
    values = sample_values()
    messages = capture_sender(monkeypatch, [values, {"only": 1.0}, values], data_compression, dh_compression)
    parser = MessageParser()
    parsed = [parser.parse(frames) for frames in messages]
    assert [message.pulse_id for message in parsed] == [1000, 1001, 1002]
    for message in parsed[0], parsed[2]:
        check_message_against_originals(message, values)
        for spec in message.data_header.channels:
            assert spec.compression == (data_compression or "none")
        # The hash is bsread's: MD5 of the data header as sent.
        assert message.main.hash == hashlib.md5(bytes(message.frames[1])).hexdigest()
    assert parsed[1].data_header.names == ("only",)
    assert parser.cache.misses == 2  # two distinct headers, the third message hit the cache
    specs = {spec.name: spec for spec in parsed[0].data_header.channels}
    assert specs["image_u16"].shape == (40, 24) and specs["image_u16"].array_shape == (24, 40)
    assert specs["row_1xn"].array_shape == (1, 5)
    assert specs["big_int32"].encoding == "big" and specs["big_int32"].dtype == np.dtype(">i4")
    assert specs["absent"].type == "float64" and specs["absent"].shape == (1,)


def test_bsread_loses_shape_where_we_keep_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented pitfalls of bsread's decoder, pinned so that a bsread fix is noticed."""
    values = {"one": np.array([7], dtype=np.int16), "row": np.arange(4, dtype=np.int8).reshape(1, 4)}
    message = MessageParser().parse(capture_sender(monkeypatch, [values], None, None)[0])
    one, row = message.data_header.channels
    assert message.value(0).shape == (1,) and message.value(1).shape == (1, 4)
    assert np.ndim(bsread_reader(one)(bytes(message.value_part(0)))) == 0
    assert bsread_reader(row)(bytes(message.value_part(1))).shape == (4,)


# --------------------------------------------------------------------------- lz4 variants

@pytest.mark.parametrize("size_order", ["<I", ">I"])
@pytest.mark.parametrize("encoding", ["little", "big"])
def test_lz4_size_field_in_either_byte_order(size_order: str, encoding: str) -> None:
    spec = ChannelSpec("wave", "float32", (5, 3), encoding, "lz4")
    array = np.arange(15, dtype=spec.dtype).reshape(3, 5)
    raw = array.tobytes()
    part = struct.pack(size_order, len(raw)) + lz4.block.compress(raw, store_size=False)
    decoded = decode_value(spec, part)
    assert decoded.dtype == spec.dtype and decoded.shape == (3, 5)
    assert np.array_equal(decoded, array)


@pytest.mark.parametrize("size_order", ["<I", ">I"])
@pytest.mark.parametrize("encoding", ["little", "big"])
def test_lz4_string_size_field_in_either_byte_order(size_order: str, encoding: str) -> None:
    spec = ChannelSpec("text", "string", encoding=encoding, compression="lz4")
    raw = ("bsread " * 40).encode()
    part = struct.pack(size_order, len(raw)) + lz4.block.compress(raw, store_size=False)
    assert decode_value(spec, part) == raw.decode()


def test_lz4_bad_parts_are_value_invalid() -> None:
    spec = ChannelSpec("wave", "int16", (4,), compression="lz4")
    good = LZ4.pack_data(np.arange(4, dtype="<i2"))
    assert np.array_equal(decode_value(spec, good), np.arange(4))
    for part in (good[:3], struct.pack("<I", 6) + good[4:], good[:4] + b"\xff" * 8, good[:-1]):
        with pytest.raises(ProtocolError) as error:
            decode_value(spec, part)
        assert error.value.reason is RejectReason.VALUE_INVALID
    with pytest.raises(ProtocolError, match="expected 8"):
        decode_value(spec, struct.pack("<I", 6) + good[4:])
    # A size field matching a huge header shape must not make lz4 allocate it.
    huge = ChannelSpec("huge", "uint8", (2 ** 31,), compression="lz4")
    with pytest.raises(ProtocolError, match="impossible"):
        decode_value(huge, struct.pack("<I", 2 ** 31) + b"\x10abc")
    # A string whose size field claims 4 GB must not make lz4 allocate 4 GB.
    text = ChannelSpec("text", "string", compression="lz4")
    with pytest.raises(ProtocolError) as error:
        decode_value(text, b"\xff\xff\xff\xff" + b"\x10abc")
    assert error.value.reason is RejectReason.VALUE_INVALID


# --------------------------------------------------------------------------- bitshuffle variants

@pytest.mark.parametrize("dtype, shape", [("<u2", (20, 1000)), (">f8", (3001,)), ("<i4", (17,)),
                                          ("<u1", (50000,)), ("?", (20000,))])
def test_bitshuffle_legacy_block_size_in_elements(dtype: str, shape: tuple[int, ...]) -> None:
    """Python producers before 2018 wrote the block size in elements, not bytes."""
    array = (np.arange(np.prod(shape)) % 251).astype(dtype).reshape(shape)
    spec = ChannelSpec("legacy", ChannelSpec.for_value("x", array).type, shape[::-1],
                       "big" if dtype.startswith(">") else "little", "bitshuffle_lz4")
    block_elements = BitshuffleLZ4.get_compression_block_size(array.dtype.itemsize)
    legacy = (struct.pack(">qi", array.nbytes, block_elements)
              + bitshuffle.compress_lz4(array.reshape(-1).view(np.uint8) if dtype == "?" else array.reshape(-1),
                                        block_elements).tobytes())
    current = BitshuffleLZ4.pack_data(array, array.dtype)
    for part in (legacy, current):
        decoded = decode_value(spec, part)
        assert decoded.shape == array.shape and decoded.dtype == spec.dtype
        assert np.array_equal(decoded, array)
    assert direct_chunk_compatible(spec, current)
    # Legacy and current coincide only for one-byte types.
    assert direct_chunk_compatible(spec, legacy) is (array.dtype.itemsize == 1)


def test_bitshuffle_corrupt_block_sizes_do_not_crash() -> None:
    """bitshuffle.decompress_lz4 reads past its input on a corrupt block size (segfault): we walk first."""
    spec = ChannelSpec("image", "uint16", (1000, 100), compression="bitshuffle_lz4")
    array = np.arange(100_000, dtype="<u2").reshape(100, 1000)
    part = bytearray(BitshuffleLZ4.pack_data(array, array.dtype))
    assert np.array_equal(decode_value(spec, bytes(part)), array)
    corrupted = bytearray(part)
    corrupted[12:16] = (2 ** 31 - 1).to_bytes(4, "big")  # first block claims 2 GB
    for bad in (bytes(corrupted), bytes(part[:100]), bytes(part[:12]), bytes(part) + b"\x00"):
        with pytest.raises(ProtocolError) as error:
            decode_value(spec, bad)
        assert error.value.reason is RejectReason.VALUE_INVALID
        assert not direct_chunk_compatible(spec, bad)
    # A nonsense block-size field over an intact stream: decoded with the default block size.
    odd_field = bytes(part[:8]) + b"\x00\x00\x00\x07" + bytes(part[12:])
    assert np.array_equal(decode_value(spec, odd_field), array)
    assert not direct_chunk_compatible(spec, odd_field)
    huge = ChannelSpec("huge", "uint8", (2 ** 40,), compression="bitshuffle_lz4")
    with pytest.raises(ProtocolError, match="does not decode"):
        decode_value(huge, struct.pack(">QI", 2 ** 40, 8192) + bytes(20))  # no 1 TB allocation
    wrong_count = struct.pack(">q", 10) + bytes(part[8:])
    with pytest.raises(ProtocolError, match="byte count is 10, expected 200000"):
        decode_value(spec, wrong_count)


@pytest.mark.parametrize("implementation", ["compiled", "python"])
def test_the_block_walk_agrees_on_both_paths(implementation: str) -> None:
    """bsread/_blockwalk.c and its Python fallback: the same end position, -1 past the end, no reads beyond."""
    from sf_bsread_writer.bsread.codecs import (
        BLOCK_WALK,
        _compiled_walk,
        _walk_blocks_python,
    )

    if implementation == "compiled":
        walk = _compiled_walk()
        if walk is None:
            pytest.skip("bsread/_blockwalk.c is not built (no C compiler at install): the Python loop is used")
    else:
        walk = _walk_blocks_python
    array = np.arange(100_000, dtype="<u2").reshape(100, 1000)
    part = bytes(BitshuffleLZ4.pack_data(array, array.dtype))
    n_blocks = 200_000 // 8192  # whole blocks of 8192 bytes (4096 elements); the rest is one more block
    end = walk(part, 12, n_blocks + 1)
    assert end == len(part) - 12 == _walk_blocks_python(part, 12, n_blocks + 1)
    assert walk(memoryview(part), 12, 0) == 0
    assert walk(part, 12, n_blocks + 50) == -1  # more blocks than bytes: not past the end
    assert walk(b"\x00\x00\x00\x05ab", 0, 2) == -1
    assert walk(b"\xff\xff\xff\xff", 0, 1) == -1  # a huge size field: never added, never followed
    assert walk(b"\x00\x00\x00\x02ab", 0, 1) == 6 and walk(b"\x00\x00\x00\x03ab", 0, 1) == -1
    assert BLOCK_WALK in ("compiled", "python")


def test_bitshuffle_strings_and_empty_strings() -> None:
    spec = ChannelSpec("text", "string", compression="bitshuffle_lz4")
    for text in ("a", "bsread ✓" * 3000):
        assert decode_value(spec, get_value_bytes(text, "bitshuffle_lz4", channel_type="string")) == text
    assert decode_value(spec, struct.pack(">QI", 0, 8192)) == ""
    assert decode_value(spec, b"") is None


# --------------------------------------------------------------------------- HDF5 direct chunks

DIRECT_CHUNK_CASES = [
    ("uint16 image", np.random.default_rng(1).integers(0, 4096, size=(64, 80), dtype=np.uint16)),
    ("float64", np.random.default_rng(2).normal(size=2049)),
    ("int8", np.random.default_rng(3).integers(-128, 127, size=10007, dtype=np.int8)),
    ("bool", np.random.default_rng(4).integers(0, 2, size=999).astype(bool)),
    ("big-endian int32 image", np.random.default_rng(5).integers(-99, 99, size=(33, 35)).astype(">i4")),
    ("big-endian float64", np.random.default_rng(6).normal(size=3).astype(">f8")),
    ("uint64 one element", np.array([2 ** 64 - 1], dtype=np.uint64)),
    ("float32 odd size", np.linspace(0, 1, 1031, dtype=np.float32)),
]


@pytest.mark.parametrize("label, array", DIRECT_CHUNK_CASES, ids=[case[0] for case in DIRECT_CHUNK_CASES])
def test_bitshuffle_part_is_byte_for_byte_the_hdf5_chunk(tmp_path: Any, label: str, array: np.ndarray) -> None:
    spec = ChannelSpec.for_value("channel", array, compression="bitshuffle_lz4")
    assert spec.array_shape == array.shape and spec.dtype.itemsize == array.dtype.itemsize
    bsread_part = BitshuffleLZ4.pack_data(array, array.dtype)
    our_part = encode_value(spec, array)
    assert our_part == bsread_part
    assert direct_chunk_compatible(spec, bsread_part)

    row_shape = (1,) + spec.array_shape
    with h5py.File(tmp_path / "chunks.h5", "w") as file:
        through_filter = file.create_dataset("filter", shape=row_shape, chunks=row_shape, dtype=spec.dtype,
                                             **hdf5plugin.Bitshuffle(cname="lz4"))
        through_filter[0] = array
        filter_mask, chunk = through_filter.id.read_direct_chunk((0,) * len(row_shape))
        assert filter_mask == 0
        assert chunk == bsread_part, f"{label}: HDF5 chunk differs from bsread's bytes"

        direct = file.create_dataset("direct", shape=row_shape, chunks=row_shape, dtype=spec.dtype,
                                     **hdf5plugin.Bitshuffle(cname="lz4"))
        direct.id.write_direct_chunk((0,) * len(row_shape), bsread_part)
    with h5py.File(tmp_path / "chunks.h5", "r") as file:
        stored = file["direct"][0]
        assert stored.dtype == spec.dtype and np.array_equal(stored, array)


def test_direct_chunk_guard_refuses_what_is_not_a_chunk() -> None:
    array = np.arange(100, dtype=np.float64)
    spec = ChannelSpec.for_value("x", array, compression="bitshuffle_lz4")
    part = BitshuffleLZ4.pack_data(array, array.dtype)
    assert direct_chunk_compatible(spec, part)
    assert direct_chunk_compatible(spec, memoryview(part)) and direct_chunk_compatible(spec, zmq.Frame(part))
    assert not direct_chunk_compatible(ChannelSpec("x", "float64", (100,)), array.tobytes())
    assert not direct_chunk_compatible(ChannelSpec("x", "float64", (101,), compression="bitshuffle_lz4"), part)
    assert not direct_chunk_compatible(spec, part[:8] + struct.pack(">I", 1024) + part[12:])  # legacy field
    assert not direct_chunk_compatible(spec, part[:11]) and not direct_chunk_compatible(spec, b"")
    string = ChannelSpec("s", "string", compression="bitshuffle_lz4")
    assert not direct_chunk_compatible(string, get_value_bytes("text", "bitshuffle_lz4", channel_type="string"))


# --------------------------------------------------------------------------- bad input, every reason

HASH = "0123456789abcdef0123456789abcdef"
GOOD_DATA_HEADER = {"htype": "bsr_d-1.1", "channels": [{"name": "a"}, {"name": "b", "type": "int32"}]}


def frames_with(main: dict[str, Any] | bytes | None = None, data_header: Any = GOOD_DATA_HEADER,
                n_value_parts: int | None = None, **main_changes: Any) -> list[bytes]:
    """A message of the good two-channel header, with the main or data header replaced or changed."""
    if main is None:
        main = {"htype": "bsr_m-1.1", "pulse_id": 1, "global_timestamp": {"sec": 1, "ns": 2}, "hash": HASH}
        main.update(main_changes)
        main = {key: value for key, value in main.items() if value is not DELETE}
    main_bytes = main if isinstance(main, bytes) else json.dumps(main).encode()
    dh_bytes = data_header if isinstance(data_header, bytes) else json.dumps(data_header).encode()
    timestamp = struct.pack("<qq", 1, 2)
    value_parts = [struct.pack("<d", 1.0), timestamp, struct.pack("<i", 5), timestamp]
    if n_value_parts is not None:
        value_parts = [struct.pack("<d", 1.0)] * n_value_parts
    return [main_bytes, dh_bytes, *value_parts]


DELETE = object()


def channel_header(**entry: Any) -> dict[str, Any]:
    return {"channels": [dict({"name": "c"}, **entry)]}


BAD_MESSAGES: list[tuple[str, list[bytes], RejectReason, str]] = [
    ("not json", frames_with(b"{not json"), RejectReason.MAIN_HEADER_NOT_JSON, "not JSON"),
    ("not utf-8", frames_with(b"\xff\xfe\xfd{"), RejectReason.MAIN_HEADER_NOT_JSON, "not JSON"),
    ("absurdly nested", frames_with(b"[" * 200_000), RejectReason.MAIN_HEADER_NOT_JSON, "not JSON"),
    ("huge integer", frames_with(b'{"pulse_id": ' + b"9" * 5000 + b"}"), RejectReason.MAIN_HEADER_NOT_JSON, ""),
    ("json list", frames_with(b"[1, 2]"), RejectReason.MAIN_HEADER_NOT_OBJECT, "list"),
    ("json null", frames_with(b"null"), RejectReason.MAIN_HEADER_NOT_OBJECT, "NoneType"),
    ("no htype", frames_with(htype=DELETE), RejectReason.BAD_HTYPE, "no htype"),
    ("htype not str", frames_with(htype=11), RejectReason.BAD_HTYPE, "11"),
    ("negative pulse_id", frames_with(pulse_id=-5), RejectReason.BAD_PULSE_ID, "pulse_id -5 is negative"),
    ("float pulse_id", frames_with(pulse_id=1.5), RejectReason.BAD_PULSE_ID, "1.5 is not an integer"),
    ("integral float pulse_id", frames_with(pulse_id=12.0), RejectReason.BAD_PULSE_ID, "not an integer"),
    ("string pulse_id", frames_with(pulse_id="12"), RejectReason.BAD_PULSE_ID, "'12' is not an integer"),
    ("bool pulse_id", frames_with(pulse_id=True), RejectReason.BAD_PULSE_ID, "True is not an integer"),
    ("null pulse_id", frames_with(pulse_id=None), RejectReason.BAD_PULSE_ID, "None is not an integer"),
    ("pulse_id beyond int64", frames_with(pulse_id=2 ** 63), RejectReason.BAD_PULSE_ID, "int64"),
    ("no hash", frames_with(hash=DELETE), RejectReason.BAD_HASH, "no hash"),
    ("hash not str", frames_with(hash=5), RejectReason.BAD_HASH, "5"),
    ("empty hash", frames_with(hash=""), RejectReason.BAD_HASH, "''"),
    ("unknown dh_compression", frames_with(dh_compression="zip"), RejectReason.UNKNOWN_COMPRESSION, "'zip'"),
    ("dh_compression not str", frames_with(dh_compression=["lz4"]), RejectReason.UNKNOWN_COMPRESSION, "['lz4']"),
    ("data header not json", frames_with(data_header=b"{channels"), RejectReason.DATA_HEADER_INVALID, "not JSON"),
    ("data header empty", frames_with(data_header=b""), RejectReason.DATA_HEADER_INVALID, "empty"),
    ("data header list", frames_with(data_header=[1]), RejectReason.DATA_HEADER_INVALID, "not an object"),
    ("channels not list", frames_with(data_header={"channels": {"a": 1}}), RejectReason.DATA_HEADER_INVALID,
     "not a list"),
    ("lz4 data header garbage", frames_with(dh_compression="lz4", data_header=b"\x05\x00\x00\x00garbage"),
     RejectReason.DATA_HEADER_INVALID, "does not decompress"),
    ("bitshuffle data header garbage", frames_with(dh_compression="bitshuffle_lz4", data_header=b"\x00" * 11),
     RejectReason.DATA_HEADER_INVALID, "does not decompress"),
    ("one part", frames_with()[:1], RejectReason.PART_COUNT, "expected 2 + 2*N parts, got 1"),
    ("missing part", frames_with(data_header={"channels": [{"name": str(n)} for n in range(3)]}, n_value_parts=5),
     RejectReason.PART_COUNT, "expected 2 + 2*3 = 8 parts, got 7"),
    ("extra part", frames_with() + [b""], RejectReason.PART_COUNT, "expected 2 + 2*2 = 6 parts, got 7"),
    ("no parts", [], RejectReason.EMPTY_MESSAGE, "no parts"),
    ("empty main header", [b"", b"{}"], RejectReason.EMPTY_MESSAGE, "main header part is empty"),
]


def _nan_stamp() -> bytes:
    return ('{"htype": "bsr_m-1.1", "pulse_id": 1, "global_timestamp": {"sec": NaN, "ns": 0}, "hash": "%s"}'
            % HASH).encode()


#: A global timestamp that is no time: the message is kept, its time is "not given" (the receive time then
#: stands in: bsread.timebase), and the header says why (was: the whole message rejected, every value lost).
BAD_CLOCKS: list[tuple[str, list[bytes], str]] = [
    ("timestamp not object", frames_with(global_timestamp=5), "not an object"),
    ("timestamp sec float", frames_with(global_timestamp={"sec": 1.5, "ns": 0}), "1.5"),
    ("timestamp sec str", frames_with(global_timestamp={"sec": "1"}), "'1'"),
    ("timestamp sec bool", frames_with(global_timestamp={"sec": True}), "True"),
    ("timestamp ns list", frames_with(global_timestamp={"sec": 1, "ns": []}), "[]"),
    ("timestamp sec NaN", frames_with(_nan_stamp()), "nan"),
    ("negative sec", frames_with(global_timestamp={"sec": -1, "ns": 0}), "-1"),
    ("negative ns", frames_with(global_timestamp={"sec": 1, "ns": -1}), "-1"),
    ("ns too large", frames_with(global_timestamp={"sec": 1, "ns": 10 ** 9}), "1000000000"),
    ("sec 2^62", frames_with(global_timestamp={"sec": 2 ** 62, "ns": 0}), str(2 ** 62)),  # was accepted
]


@pytest.mark.parametrize("label, frames, detail", BAD_CLOCKS, ids=[case[0] for case in BAD_CLOCKS])
def test_a_bad_clock_costs_the_time_not_the_message(label: str, frames: list[bytes], detail: str) -> None:
    message = MessageParser().parse(frames)
    assert (message.main.sec, message.main.ns, message.timestamp) == (0, 0, 0.0)
    assert detail in message.main.timestamp_invalid and "global_timestamp" in message.main.timestamp_invalid
    assert message.value(0).tolist() == [1.0] and message.value(1).tolist() == [5]
    good = MessageParser().parse(frames_with())
    assert good.main.timestamp_invalid == "" and (good.main.sec, good.main.ns) == (1, 2)
    assert MessageParser().parse(frames_with(global_timestamp=DELETE)).main.timestamp_invalid == ""  # not given


def two_channels(**bad_entry: Any) -> dict[str, Any]:
    """A good float64 channel "a" and a channel "c" (the int32 value part) with ``bad_entry`` in its header."""
    return {"channels": [{"name": "a"}, dict({"name": "c", "type": "int32"}, **bad_entry)]}


#: Every per-channel field of a data header that can be wrong: that channel is refused (its values absent,
#: the reason kept with it), the other channels of the message are read as always (was: the whole message).
BAD_CHANNELS: list[tuple[str, Any, RejectReason, str, str]] = [
    ("channel compression", two_channels(compression="zlib"), RejectReason.UNKNOWN_COMPRESSION, "c",
     "compression 'zlib'"),
    ("unknown type", two_channels(type="float128"), RejectReason.UNKNOWN_TYPE, "c", "type 'float128'"),
    ("type not str", two_channels(type=8), RejectReason.UNKNOWN_TYPE, "c", "type 8"),
    ("channel not object", {"channels": [{"name": "a"}, "c"]}, RejectReason.DATA_HEADER_INVALID, "channel 1",
     "not an object"),
    ("no name", {"channels": [{"name": "a"}, {"type": "int32"}]}, RejectReason.DATA_HEADER_INVALID, "channel 1",
     "name None"),
    ("empty name", {"channels": [{"name": "a"}, {"name": "", "type": "int32"}]}, RejectReason.DATA_HEADER_INVALID,
     "channel 1", "name ''"),
    ("zero shape", two_channels(shape=[0]), RejectReason.DATA_HEADER_INVALID, "c", "shape [0]"),
    ("empty shape", two_channels(shape=[]), RejectReason.DATA_HEADER_INVALID, "c", "shape []"),
    ("float shape", two_channels(shape=[1.5]), RejectReason.DATA_HEADER_INVALID, "c", "1.5"),
    ("bool shape", two_channels(shape=[True]), RejectReason.DATA_HEADER_INVALID, "c", "True"),
    ("string shape", two_channels(shape="4"), RejectReason.DATA_HEADER_INVALID, "c", "'4'"),
    ("huge shape", two_channels(shape=[2 ** 31, 2 ** 31]), RejectReason.DATA_HEADER_INVALID, "c",
     "more than a message may have"),
    ("bad encoding", two_channels(encoding="middle"), RejectReason.DATA_HEADER_INVALID, "c", "'middle'"),
    ("zero modulo", two_channels(modulo=0), RejectReason.DATA_HEADER_INVALID, "c", "modulo 0"),
    ("negative offset", two_channels(offset=-1), RejectReason.DATA_HEADER_INVALID, "c", "offset -1"),
    ("duplicate name", {"channels": [{"name": "a"}, {"name": "a", "type": "int32"}]},
     RejectReason.DATA_HEADER_INVALID, "a", "duplicate"),
]


@pytest.mark.parametrize("label, data_header, reason, name, detail", BAD_CHANNELS,
                         ids=[case[0] for case in BAD_CHANNELS])
def test_a_bad_channel_in_a_data_header_costs_only_itself(label: str, data_header: Any, reason: RejectReason,
                                                           name: str, detail: str) -> None:
    message = MessageParser().parse(frames_with(data_header=data_header))
    good, bad = message.data_header.channels
    assert not good.refused and message.value(0).tolist() == [1.0] and message.is_present(0)
    assert bad.refused is reason and bad.name == name and detail in bad.refused_detail
    assert message.data_header.refused == (1,)
    # Nothing is sized by what was refused: it is never present, never decoded, never a direct chunk.
    assert not message.is_present(1) and not direct_chunk_compatible(bad, message.value_part(1))
    with pytest.raises(ProtocolError) as caught:
        message.value(1)
    assert caught.value.reason is reason and detail in caught.value.detail
    assert message.channel_seconds(1) == message.timestamp
    # The good channel is found by its name, the refused one by none (a duplicate: the first keeps it).
    assert message.data_header.index_of("a") == 0
    assert (name in message.data_header) is (name == "a")


def test_a_header_of_only_bad_channels_is_still_a_message() -> None:
    message = MessageParser().parse(frames_with(data_header={"channels": [5, {"name": "x", "type": "cplx"}]}))
    assert message.n_channels == 2 and message.data_header.refused == (0, 1)
    assert [spec.refused for spec in message.data_header.channels] == [RejectReason.DATA_HEADER_INVALID,
                                                                       RejectReason.UNKNOWN_TYPE]


def test_an_implausible_channel_timestamp_is_no_time() -> None:
    """One policy (bsread.timebase.plausible_stamp) for the global and every channel timestamp."""
    frames = build_message(7, [{"name": "A", "type": "int32"}, {"name": "B", "type": "int32"}],
                           [np.int32(1), np.int32(2)], timestamp=(1_700_000_000, 500),
                           channel_timestamps=[(2 ** 62, 0), (-5, 0)])
    message = MessageParser().parse(frames)
    for index in (0, 1):
        assert message.channel_seconds(index) == message.timestamp  # the message's time stands in
        with pytest.raises(ProtocolError) as caught:
            message.channel_timestamp(index)
        assert caught.value.reason is RejectReason.CHANNEL_TIMESTAMP_INVALID and "implausible" in caught.value.detail
        assert message.value(index).tolist() == [index + 1]


@pytest.mark.parametrize("label, frames, reason, detail", BAD_MESSAGES, ids=[case[0] for case in BAD_MESSAGES])
def test_bad_messages_are_rejected_with_their_reason(label: str, frames: list[bytes], reason: RejectReason,
                                                     detail: str) -> None:
    parser = MessageParser()
    with pytest.raises(ProtocolError) as error:
        parser.parse(frames)
    assert error.value.reason is reason
    assert detail in error.value.detail
    assert isinstance(error.value, ValueError) and str(error.value).startswith(reason.value + ": ")


def test_oversize_is_checked_before_any_parsing() -> None:
    frames = frames_with(b"{not even json" + b" " * 100)
    with pytest.raises(ProtocolError) as error:
        MessageParser(max_message_bytes=100).parse(frames)
    assert error.value.reason is RejectReason.OVERSIZE
    assert error.value.detail == f"message has {sum(map(len, frames))} bytes, more than the limit of 100"
    good = frames_with()
    assert MessageParser(max_message_bytes=sum(map(len, good))).parse(good).n_channels == 2


def test_value_and_timestamp_decoding_errors_have_their_reasons() -> None:
    spec = ChannelSpec("wave", "int32", (3,))
    with pytest.raises(ProtocolError) as error:
        decode_value(spec, b"\x00" * 8)
    assert error.value.reason is RejectReason.VALUE_INVALID
    assert error.value.detail == "channel 'wave': value has 8 bytes, expected 12 for int32 shape [3]"
    with pytest.raises(ProtocolError) as error:
        decode_timestamp(spec, b"\x00" * 12)
    assert error.value.reason is RejectReason.CHANNEL_TIMESTAMP_INVALID
    assert "12 bytes, expected 16" in error.value.detail


def test_a_malformed_channel_timestamp_costs_the_time_not_the_value() -> None:
    """channel_seconds is what every consumer (web, CA, ranges) shows: a timestamp part of the wrong
    size (the parser does not check it) falls back to the message's time instead of raising."""
    frames = build_message(7, [{"name": "A", "type": "int32"}, {"name": "B", "type": "int32", "encoding": "big"}],
                           [np.int32(1), np.int32(2)], timestamp=(1_700_000_000, 500),
                           channel_timestamps=[(1_700_000_005, 0), (1_700_000_006, 9)])
    frames[3] = b"\x01" * 5
    message = MessageParser().parse(frames)
    assert message.value(0).tolist() == [1]
    assert message.channel_seconds(0) == message.timestamp == 1_700_000_000 + 500e-9
    assert message.channel_seconds(1) == 1_700_000_006 + 9e-9  # big-endian, whole
    with pytest.raises(ProtocolError):  # the strict decoder still says what is wrong
        message.channel_timestamp(0)


def test_display_text_that_is_not_text_becomes_text_for_every_consumer() -> None:
    """A sender's unit, description or enum label with NUL or a lone surrogate (valid JSON: "\\u0000",
    "\\ud800") is no UTF-8 a record field, an HDF5 attribute or a page can hold: the parser hands on
    U+FFFD there, so no consumer fails on it (the CA gateway's record plan raised UnicodeEncodeError)."""
    from sf_bsread_writer.ca.camapping import ioc_record_for

    spec = ChannelSpec.from_header({"name": "X", "type": "uint8", "unit": "m\ud800", "description": "a\u0000b",
                                    "enum_strings": ["ok", "n\udfffo"]})
    assert spec.display_value("unit") == "m\ufffd" and spec.display_value("description") == "a\ufffdb"
    assert spec.display_value("enum_strings") == ("ok", "n\ufffdo")
    record = ioc_record_for(spec.type, spec.shape, display=spec.display)
    assert record.description == "a\ufffdb" and record.enum_strings == ("ok", "n\ufffdo")


def test_every_reject_reason_is_tested_and_stable() -> None:
    covered = {case[2] for case in BAD_MESSAGES} | {case[2] for case in BAD_CHANNELS}
    covered |= {RejectReason.BAD_TIMESTAMP,  # the key of a replaced global timestamp: BAD_CLOCKS
                RejectReason.OVERSIZE, RejectReason.VALUE_INVALID, RejectReason.CHANNEL_TIMESTAMP_INVALID}
    assert covered == set(RejectReason)
    assert {reason.value for reason in RejectReason} == {
        "main_header_not_json", "main_header_not_object", "bad_htype", "bad_pulse_id", "bad_timestamp",
        "bad_hash", "data_header_invalid", "unknown_compression", "unknown_type", "part_count", "oversize",
        "empty_message", "value_invalid", "channel_timestamp_invalid"}
    assert str(RejectReason.OVERSIZE) == "oversize" and RejectReason("oversize") is RejectReason.OVERSIZE


@pytest.mark.parametrize("htype", ["bsr_stop-1.0", "bsr_reconnect-1.0", "bsr_d-1.1", ""])
def test_control_messages_are_ignored_not_rejected(htype: str) -> None:
    one_part = [json.dumps({"htype": htype}).encode()]
    with pytest.raises(IgnoredMessage) as ignored:
        MessageParser().parse(one_part)
    assert ignored.value.htype == htype and not isinstance(ignored.value, ProtocolError)
    with pytest.raises(IgnoredMessage):
        MessageParser().parse(frames_with(htype=htype))


# --------------------------------------------------------------------------- main header variants

def test_main_header_defaults_and_variants() -> None:
    java = parse_main_header(b'{"htype": "bsr_m-1.1", "hash": "h"}')  # Java omits defaults
    assert (java.pulse_id, java.sec, java.ns, java.dh_compression, java.timestamp) == (0, 0, 0, "none", 0.0)
    old = parse_main_header(b'{"htype": "bsr_m-1.0", "pulse_id": 5, "global_timestamp": {"epoch": 7, "ns": 9},'
                            b' "hash": "h", "dh_compression": "LZ4"}')
    assert (old.htype, old.pulse_id, old.sec, old.ns, old.dh_compression) == ("bsr_m-1.0", 5, 7, 9, "lz4")
    assert old.timestamp == pytest.approx(7.000000009)
    assert parse_main_header(b'{"htype": "bsr_m-1.1", "hash": "h", "global_timestamp": {"sec": 3}}').sec == 3
    assert parse_main_header(b'{"htype": "bsr_m-1.1", "hash": "h", "dh_compression": null}').dh_compression == "none"
    text = b'{"htype": "bsr_m-1.1", "pulse_id": 20000000000, "hash": "h"}'
    for frame in (text, bytearray(text), memoryview(text), zmq.Frame(text), text.decode()):
        assert parse_main_header(frame).pulse_id == 20_000_000_000
    header = parse_main_header(text)
    with pytest.raises(AttributeError):
        header.pulse_id = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- channel specs and data headers

def test_channel_spec_defaults_normalization_and_derived_values() -> None:
    spec = ChannelSpec.from_header({"name": "cam"})
    assert spec == ChannelSpec("cam", "float64", (1,), "little", "none", 1, 0)
    assert (spec.dtype, spec.array_shape, spec.n_elements, spec.nbytes, spec.is_string) == (
        np.dtype("<f8"), (1,), 1, 8, False)
    image = ChannelSpec.from_header({"name": "img", "type": "UInt16", "shape": [1280, 1024], "encoding": ">",
                                     "compression": None, "modulo": None, "offset": 3})
    assert (image.type, image.shape, image.array_shape, image.encoding, image.compression, image.modulo) == (
        "uint16", (1280, 1024), (1024, 1280), "big", "none", 1)
    assert image.dtype == np.dtype(">u2") and image.nbytes == 1280 * 1024 * 2
    assert image.metadata() == {"name": "img", "type": "uint16", "shape": [1280, 1024], "encoding": "big",
                                "compression": "none", "modulo": 1, "offset": 3}
    json.dumps(image.metadata())
    text = ChannelSpec("s", "string", encoding="<")
    assert text.is_string and text.dtype == np.dtype("u1") and text.nbytes is None and text.encoding == "little"
    assert hash(image) == hash(ChannelSpec.from_header(image.metadata()))
    assert ChannelSpec.for_value("b", np.array([[True]])).type == "bool"
    assert ChannelSpec.for_value("f", 1.0).type == "float64" and ChannelSpec.for_value("t", "x").is_string
    assert ChannelSpec.for_value("i", np.zeros((2, 3), ">i2")).shape == (3, 2)


def test_data_header_lookup() -> None:
    header = DataHeader("h", (ChannelSpec("a"), ChannelSpec("b")))
    assert header.names == ("a", "b") and header.index_of("b") == 1 and "a" in header and "c" not in header
    with pytest.raises(KeyError):
        header.index_of("c")
    empty = MessageParser().parse(frames_with(data_header={"htype": "bsr_d-1.1"}, n_value_parts=0))
    assert empty.n_channels == 0 and empty.data_header.names == ()


def test_message_accessors() -> None:
    message = MessageParser().parse(frames_with())
    assert message.value(0).tolist() == [1.0] and message.value(1).tolist() == [5]
    assert message.channel_timestamp(1) == (1, 2)
    assert bytes(message.value_part(1)) == struct.pack("<i", 5)
    assert bytes(message.timestamp_part(0)) == struct.pack("<qq", 1, 2)
    with pytest.raises(IndexError):
        message.value(2)
    with pytest.raises(IndexError):
        message.is_present(-1)
    # Present timestamp, empty value: no data.
    frames = frames_with()
    frames[2] = b""
    absent = MessageParser().parse(frames)
    assert not absent.is_present(0) and absent.value(0) is None and absent.channel_timestamp(0) == (1, 2)


# --------------------------------------------------------------------------- data-header cache

def test_cache_parses_once_per_hash_and_caches_failures() -> None:
    cache = DataHeaderCache(max_entries=2)
    good = json.dumps(GOOD_DATA_HEADER).encode()
    first = cache.get("h1", good)
    assert cache.get("h1", bytearray(good)) is first  # the same bytes: a hit, not parsed again
    assert (cache.hits, cache.misses) == (1, 1)
    # The hash is only a key: other bytes under it are parsed, garbage is refused (was: taken unseen).
    with pytest.raises(ProtocolError) as garbage:
        cache.get("h1", b"not even looked at")
    assert garbage.value.reason is RejectReason.DATA_HEADER_INVALID
    assert cache.get("h1", good).names == ("a", "b")

    cache = DataHeaderCache(max_entries=2)
    cache.get("h1", good)

    bad = b'{"channels": {"x": "float128"}}'  # a channel list that is no list: the message
    errors = []
    for _ in range(3):
        with pytest.raises(ProtocolError) as error:
            cache.get("bad", bad)
        errors.append(error.value)
    assert cache.misses == 2  # one parse for three identical bad headers
    assert len({id(error) for error in errors}) == 3 and {error.reason for error in errors} == {RejectReason.DATA_HEADER_INVALID}
    # A failure is reused only for the same bytes: a good header under that hash still parses.
    assert cache.get("bad", good).names == ("a", "b")
    assert cache.misses == 3 and len(cache) == 2

    cache.get("h3", good)  # evicts the least recently used ("h1")
    assert len(cache) == 2
    cache.get("h1", good)
    assert cache.misses == 5
    # Same hash, other dh_compression: another entry.
    compressed = get_value_bytes(good.decode(), "lz4")
    assert cache.get("h1", compressed, "lz4").names == ("a", "b")
    with pytest.raises(ValueError):
        DataHeaderCache(0)


# --------------------------------------------------------------------------- build_message

@pytest.mark.parametrize("dh_compression", ["none", "lz4", "bitshuffle_lz4"])
@pytest.mark.parametrize("compression", ["none", "lz4", "bitshuffle_lz4"])
def test_build_message_round_trips_through_parser_and_bsread(compression: str, dh_compression: str) -> None:
    values = {name: value for name, value in sample_values().items()
              if value is not None and not (isinstance(value, str) and value == "")}
    specs = [ChannelSpec.for_value(name, value, compression) for name, value in values.items()]
    specs.append(ChannelSpec("absent", "int16", (4,), "big", compression))
    specs.append({"name": "java_defaults"})  # a data-header dict with everything omitted
    all_values = list(values.values()) + [None, 2.5]
    frames = build_message(20_000_000_000, specs, all_values, timestamp=1_700_000_000.25,
                           dh_compression=dh_compression,
                           channel_timestamps=[(5, 6)] + [None] * (len(specs) - 1))
    assert all(isinstance(frame, bytes) for frame in frames)
    message = MessageParser().parse(frames)
    assert (message.pulse_id, message.main.sec, message.main.ns) == (20_000_000_000, 1_700_000_000, 250_000_000)
    assert message.main.hash == hashlib.md5(frames[1]).hexdigest()
    assert message.channel_timestamp(0) == (5, 6) and message.channel_timestamp(1) == (1_700_000_000, 250_000_000)
    for index, (name, original) in enumerate(values.items()):
        assert_decoded_equals(original, message.value(index))
        spec = message.data_header.channels[index]
        # bsread decodes our frames identically, and encodes values to the same bytes.
        theirs = bsread_reader(spec)(frames[2 + 2 * index])
        if spec.is_string:
            assert theirs == original
        else:
            assert np.array_equal(np.asarray(theirs).reshape(-1), message.value(index).reshape(-1))
        if compression != "none" or not spec.is_string:
            assert frames[2 + 2 * index] == get_value_bytes(original, None if compression == "none" else compression,
                                                            channel_type=spec.type)
    absent = message.data_header.index_of("absent")
    assert frames[2 + 2 * absent] == frames[3 + 2 * absent] == b"" and message.value(absent) is None
    assert message.value(message.n_channels - 1).tolist() == [2.5]
    # bsread's data-header reader sees the same header.
    bsread_header = json.loads(get_value_reader("string", None if dh_compression == "none" else dh_compression)(frames[1]))
    assert [channel["name"] for channel in bsread_header["channels"]] == list(message.data_header.names)
    main = json.loads(frames[0])
    assert ("dh_compression" in main) is (dh_compression != "none")


def test_build_message_refuses_inconsistent_input() -> None:
    spec = ChannelSpec("img", "uint8", (3, 2))
    build_message(1, [spec], [np.zeros((2, 3), np.uint8)], timestamp=(1, 2))
    build_message(1, [spec], [list(range(6))], timestamp=(1, 2))  # a flat list fills the image
    with pytest.raises(ValueError, match="6"):
        build_message(1, [spec], [np.zeros(5)])
    with pytest.raises(ValueError, match="shape"):
        build_message(1, [spec], [np.zeros((3, 2))])
    with pytest.raises(ValueError):
        build_message(1, [spec], [])
    with pytest.raises(ValueError):
        build_message(-1, [spec], [None])
    with pytest.raises(ValueError):
        build_message(1, [spec], [None], dh_compression="zip")
    with pytest.raises(ProtocolError):
        build_message(1, [{"name": "x", "type": "float128"}], [1.0])
    control = build_message(1, [], [], htype="bsr_stop-1.0")
    with pytest.raises(IgnoredMessage):
        MessageParser().parse(control)


# --------------------------------------------------------------------------- fuzzing

def parse_or_reject(parser: MessageParser, frames: Sequence[Any]) -> Message | None:
    """parse(), decoding every value and timestamp of an accepted message; only our errors may escape."""
    try:
        message = parser.parse(frames)
    except (ProtocolError, IgnoredMessage):
        return None
    for index in range(message.n_channels):
        for decode in (message.value, message.channel_timestamp):
            try:
                decode(index)
            except ProtocolError:
                pass
    return message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
    | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
main_keys = st.sampled_from(["htype", "pulse_id", "global_timestamp", "hash", "dh_compression", "sec", "ns",
                             "epoch", "extra"])
channel_keys = st.sampled_from(["name", "type", "shape", "encoding", "compression", "modulo", "offset"])


@st.composite
def json_ish_messages(draw: st.DrawFn) -> list[bytes]:
    main = draw(st.dictionaries(main_keys, json_values | st.sampled_from(
        ["bsr_m-1.1", "bsr_stop-1.0", 5, {"sec": 1, "ns": 2}, {"epoch": 3}, "lz4", "bitshuffle_lz4", "none", HASH]),
        max_size=6))
    if draw(st.booleans()):
        main = {"htype": "bsr_m-1.1", "hash": draw(st.text(min_size=1, max_size=4)), **main}
    channel_entry = st.dictionaries(channel_keys, json_values | st.sampled_from(
        ["a", "b", "int16", "string", "bool", [2, 3], [1], "big", "<", "lz4", "bitshuffle_lz4", 1, 0]),
        max_size=7)
    data_header = draw(st.one_of(json_values, st.fixed_dictionaries({"channels": st.lists(channel_entry, max_size=3)})))
    parts = draw(st.lists(st.binary(max_size=40), max_size=8))
    return [json.dumps(main).encode(), json.dumps(data_header).encode(), *parts]


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_arbitrary_frames(frames: list[bytes]) -> None:
    parse_or_reject(MessageParser(max_message_bytes=4096), frames)


@FUZZ
@given(json_ish_messages())
def test_fuzz_json_ish_headers(frames: list[bytes]) -> None:
    parse_or_reject(MessageParser(), frames)


def valid_messages() -> list[list[bytes]]:
    rng = np.random.default_rng(7)
    messages = []
    for compression in ("none", "lz4", "bitshuffle_lz4"):
        for dh_compression in ("none", "lz4", "bitshuffle_lz4"):
            specs = [ChannelSpec("img", "uint16", (40, 30), "big", compression),
                     ChannelSpec("text", "string", compression=compression),
                     ChannelSpec("x", "float64", compression=compression)]
            messages.append(build_message(5, specs, [rng.integers(0, 9, (30, 40)), "text " * 10, 1.5],
                                          timestamp=(1, 2), dh_compression=dh_compression))
    return messages


VALID_MESSAGES = valid_messages()


@FUZZ
@given(st.sampled_from(range(len(VALID_MESSAGES))), st.data())
def test_fuzz_mutated_valid_messages(which: int, data: st.DataObject) -> None:
    """Flip, cut and extend bytes of real messages: compressed parts too. Never a crash, never another error."""
    frames = list(VALID_MESSAGES[which])
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(frames) - 1))
        frame = bytearray(frames[index])
        action = data.draw(st.sampled_from(["flip", "cut", "extend", "set_int"]))
        if action == "flip" and frame:
            position = data.draw(st.integers(0, len(frame) - 1))
            frame[position] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            frame = frame[: data.draw(st.integers(0, len(frame)))]
        elif action == "extend":
            frame += data.draw(st.binary(min_size=1, max_size=16))
        elif action == "set_int" and len(frame) >= 16:
            position = data.draw(st.integers(0, len(frame) - 4))
            frame[position:position + 4] = data.draw(st.integers(0, 2 ** 32 - 1)).to_bytes(4, "big")
        frames[index] = bytes(frame)
    parse_or_reject(MessageParser(), frames)


@FUZZ
@given(st.sampled_from(["none", "lz4", "bitshuffle_lz4"]), st.sampled_from(["int8", "uint16", "float64", "string"]),
       st.binary(max_size=200))
def test_fuzz_decode_value_of_random_bytes(compression: str, channel_type: str, part: bytes) -> None:
    spec = ChannelSpec("x", channel_type, (4,) if channel_type != "string" else (1,), "little", compression)
    for candidate in (part, struct.pack(">QI", spec.nbytes or len(part), 8192) + part):
        try:
            value = decode_value(spec, candidate)
        except ProtocolError as error:
            assert error.reason is RejectReason.VALUE_INVALID
            continue
        if value is not None and not spec.is_string:
            assert value.shape == spec.array_shape and value.dtype == spec.dtype


def test_a_channel_declaring_more_bytes_than_a_message_may_have_is_refused() -> None:
    parser = MessageParser(max_message_bytes=10_000)
    for shape in ([2**31, 2**31], [10_001], [2**15, 2**15]):
        frames = build_message(1, [{"name": "H", "type": "uint8", "shape": shape}, {"name": "G", "type": "int32"}],
                               [None, 7])
        assert sum(map(len, frames)) < 10_000  # the message itself is small
        message = parser.parse(frames)
        refused = message.data_header.channels[0]
        assert refused.refused is RejectReason.DATA_HEADER_INVALID
        assert "bytes per value, more than a message may have (10000)" in refused.refused_detail
        assert refused.shape == (1,) and refused.nbytes == 0  # nothing sized by the claim
        assert message.value(1).tolist() == [7]  # the other channel costs nothing
    fits = build_message(1, [{"name": "H", "type": "uint8", "shape": [10_000]}], [None])
    assert parser.parse(fits).data_header.channels[0].nbytes == 10_000  # at the limit: fine
    # Compressed, a value may be larger than the message (up to LZ4's largest ratio): an image kept whole.
    image = np.zeros((512, 1024), dtype="<u2")  # 1 MB, compressed to ~6 kB
    compressed = build_message(1, [{"name": "I", "type": "uint16", "shape": [1024, 512],
                                    "compression": "bitshuffle_lz4"}], [image])
    assert sum(map(len, compressed)) < 10_000
    assert (parser.parse(compressed).value(0) == image).all()
    beyond = parser.parse(build_message(1, [{"name": "I", "type": "uint16", "shape": [2**31, 2**31],
                                             "compression": "lz4"}], [None]))
    assert "decompressed" in beyond.data_header.channels[0].refused_detail
