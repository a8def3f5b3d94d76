"""h5format: the SwissFEL layout on real files, read back with plain h5py.

Messages are built with ``build_message`` and parsed with
``MessageParser`` so that the file sees exactly what the writer
will give it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (bitshuffle filter for reading)
import numpy as np
import pytest

from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.bsread.codecs import direct_chunk_compatible
from sf_bsread_writer.bsread.message import Message, MessageParser
from sf_bsread_writer.h5 import calls, columns, journal, journaled, layout, variants
from sf_bsread_writer.h5 import file as h5_file
from sf_bsread_writer.h5.file import H5File
from sf_bsread_writer.replay.messages import MissingRange

from .helpers import ROOT, Child, wait_for

_PARSER = MessageParser()

NUMERIC_TYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                 "float32", "float64"]


def channel(name: str, type: str = "float64", shape: Sequence[int] = (1,), encoding: str = "little",
            compression: str = "none") -> dict[str, Any]:
    return {"name": name, "type": type, "shape": list(shape), "encoding": encoding, "compression": compression}


def message(pulse_id: int, channels: Sequence[dict[str, Any]], values: Sequence[Any],
            timestamp: float | None = None) -> Message:
    """A parsed message as the writer gets it from the wire."""
    frames = build_message(pulse_id, channels, values,
                                    timestamp=timestamp if timestamp is not None else 1_700_000_000 + pulse_id / 100)
    return _PARSER.parse(frames)


def value_for(type: str, pulse_id: int, shape: Sequence[int] = (1,)) -> Any:
    """A deterministic value of ``type`` and bsread ``shape`` (fastest first) for ``pulse_id``."""
    array_shape = tuple(shape[::-1])
    count = int(np.prod(array_shape))
    if type == "string":
        return f"pulse {pulse_id} ü"
    if type == "bool":
        values = (np.arange(count) + pulse_id) % 2 == 0
    else:
        info = np.iinfo(type) if np.dtype(type).kind in "iu" else None
        base = np.arange(count, dtype="f8") + pulse_id
        if info is not None:
            values = (base % min(int(info.max), 10_000)).astype(type)
            values.flat[0] = info.max if pulse_id % 2 else info.min  # the extremes survive too
        else:
            values = (base * 0.25 + 1e-3).astype(type)
    return values.reshape(array_shape)


def read(path: Path) -> h5py.File:
    return h5py.File(path, "r")


# --------------------------------------------------------------------- general


def test_general_datasets_are_fixed_length_strings_with_not_given_default(tmp_path: Path) -> None:
    path = tmp_path / "general.h5"
    params = {"general/created": "2024-05-01T10:00:00", "general/user": "p12345", "general/process": "daq",
              "general/detector": "JF07", "general/exposure": 0.5, "run/number": 17, "general/tags": ["a", "b"]}
    H5File(path, params).close()
    with read(path) as f:
        general = f["general"]
        assert general["created"][()] == b"2024-05-01T10:00:00"
        assert general["created"].dtype.kind == "S" and general["created"].shape == ()
        assert general["user"][()] == b"p12345"
        assert general["instrument"][()] == b"not given"
        assert general["detector"][()] == b"JF07"
        assert general["exposure"][()] == 0.5
        assert general["run.number"][()] == 17
        assert general["tags"][()] == b'["a", "b"]'
        assert json.loads(general.attrs["parameters"]) == params
        assert f.attrs["format_version"] == layout.FORMAT_VERSION
        assert f.attrs["complete"] == 1
        assert f.attrs["number_of_messages"] == 0


# ---------------------------------------------------------------- every type


@pytest.mark.parametrize("encoding", ["little", "big"])
@pytest.mark.parametrize("type", NUMERIC_TYPES)
def test_every_numeric_type_scalar_and_array_round_trips_exactly(tmp_path: Path, type: str, encoding: str) -> None:
    path = tmp_path / "types.h5"
    channels = [channel("SCALAR", type, (1,), encoding), channel("WAVE", type, (7,), encoding),
                channel("IMAGE", type, (5, 3), encoding)]
    pulse_ids = list(range(1000, 1013))
    with H5File(path, block_rows=4) as h5:
        for pulse_id in pulse_ids:
            h5.append(message(pulse_id, channels, [value_for(type, pulse_id, c["shape"]) for c in channels]))
    with read(path) as f:
        for spec in channels:
            group = f["data"][spec["name"]]
            data = group["data"]
            assert data.shape == (len(pulse_ids), *spec["shape"][::-1])
            # Native byte order whatever the channel's encoding (as the original and psi-bsread's writer).
            expected_dtype = np.dtype(bool) if type == "bool" else np.dtype(type).newbyteorder("=")
            assert data.dtype == expected_dtype
            for row, pulse_id in enumerate(pulse_ids):
                np.testing.assert_array_equal(
                    data[row], np.asarray(value_for(type, pulse_id, spec["shape"])).reshape(spec["shape"][::-1]))
            assert list(group["pulse_id"][:]) == pulse_ids
            assert group["pulse_id"].dtype == np.dtype("<i8")
            assert group["is_data_present"].dtype == np.dtype("u1")
            assert list(group["is_data_present"][:]) == [1] * len(pulse_ids)
            assert group.attrs["type"] == type
            assert list(group.attrs["shape"]) == spec["shape"]
            assert group.attrs["encoding"] == encoding
            assert group.attrs["compression"] == "none"


def test_display_metadata_of_the_data_header_become_channel_attributes(tmp_path: Path) -> None:
    """Units, precision, enum states, description (the CA bridge sends an IOC's) are kept with the data;
    a malformed one is dropped, never the message."""
    path = tmp_path / "display.h5"
    channels = [dict(channel("AI", "float64", (1,), "little"), unit="mm", precision=3, description="beam x"),
                dict(channel("STATE", "uint16", (1,), "little"), enum_strings=["Off", "On"]),
                dict(channel("ODD", "float64", (1,), "little"), unit=5, precision="three")]
    with H5File(path, block_rows=4) as h5:
        h5.append(message(1000, channels, [1.5, np.uint16(1), 2.5]))
    with read(path) as f:
        ai, state, odd = (f["data"][name] for name in ("AI", "STATE", "ODD"))
        assert (ai.attrs["unit"], ai.attrs["precision"], ai.attrs["description"]) == ("mm", 3, "beam x")
        assert state.attrs["enum_strings"].tolist() == ["Off", "On"]
        assert "unit" not in odd.attrs and "precision" not in odd.attrs and odd["data"][0, 0] == 2.5


def test_a_new_header_under_a_reused_hash_is_a_new_header(tmp_path: Path) -> None:
    """The data-header hash is the sender's word, never checked: a sender that reorders its channels
    without a new hash must not get A's values stored under B (the parser parses the new bytes into
    a new header; the file must follow the header, not the hash)."""
    first = build_message(1, [channel("A"), channel("B", "int32")], [1.5, np.int32(10)], timestamp=1.7e9)
    swapped = build_message(2, [channel("B", "int32"), channel("A")], [np.int32(20), 2.5], timestamp=1.7e9)
    main = json.loads(swapped[0])
    main["hash"] = json.loads(first[0])["hash"]
    swapped[0] = json.dumps(main).encode()
    path = tmp_path / "reused_hash.h5"
    with H5File(path) as h5:
        h5.append(_PARSER.parse(first))
        h5.append(_PARSER.parse(swapped))
    with read(path) as f:
        assert f["data/A/data"][:, 0].tolist() == [1.5, 2.5]
        assert f["data/B/data"][:, 0].tolist() == [10, 20]


def _describe(path: Path) -> dict[str, Any]:
    """Everything a reader can see of a file: every object, dataset property, value and attribute."""
    found: dict[str, Any] = {}

    def attributes(obj: Any) -> dict[str, Any]:
        out = {}
        for key in obj.attrs:
            value = obj.attrs[key]
            stored = obj.attrs.get_id(key)
            out[key] = (str(stored.dtype), stored.shape, repr(value.tolist() if hasattr(value, "tolist") else value))
        return out

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            plist = obj.id.get_create_plist()
            filters = [plist.get_filter(i)[:3] for i in range(plist.get_nfilters())]
            values = obj[()]
            found[name] = ("dataset", str(obj.dtype), obj.shape, obj.maxshape, obj.chunks, repr(obj.fillvalue),
                           filters, repr(values.tolist()), attributes(obj))
        else:
            found[name] = ("group", attributes(obj))
        parent, _, link = name.rpartition("/")
        group = obj.file[parent or "/"]  # held: the link proxy does not keep the group's id open
        found[f"link {name}"] = group.id.links.get_info(link.encode("utf-8")).cset  # ASCII or UTF-8

    with h5py.File(path, "r") as f:
        f.visititems(visit)
        found["/"] = attributes(f)
    return found


def test_channel_groups_copied_from_a_template_equal_groups_made_in_full(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """ColumnMaker copies a finished group of the same kind (H5Ocopy) instead of making each one: the file
    must be the same, object for object, for every kind of channel and every way a group comes to be
    (the first message, a channel first present later, a retype, one never present, display metadata)."""
    image = np.arange(80 * 96, dtype="<u2").reshape(96, 80)

    def channels(n: int) -> list[dict[str, Any]]:
        chans = [channel(f"S{i}") for i in range(4)] + [
            channel("BE", "int32", encoding="big"), channel("W", "float32", (7,)), channel("T", "string"),
            channel("IMG", "uint16", (80, 96), compression="bitshuffle_lz4"), channel("LZ", "int16", (5,),
                                                                                      compression="lz4"),
            channel("B", "bool"), dict(channel("U", "float64"), unit="mJ", description="pulse energy",
                                       precision=3),
            dict(channel("E", "uint8"), enum_strings=["off", "on"]), channel("LATE"), channel("NEVER", "int64"),
            dict(channel("ENERGY-µJ"), description="Ä"), channel("ÄRR", "int16"),
            channel("RETYPED", "float64" if n < 5 else "int16", (1,) if n < 5 else (3,))]
        return chans

    def values(n: int) -> list[Any]:
        return [n * 1.5, n * 2.5, -n, n / 3, np.int32(-n * 7), np.arange(7, dtype=np.float32) * n, f"row {n}",
                image + n, np.arange(5, dtype=np.int16) - n, np.bool_(n % 2), n * 0.1, np.uint8(n % 2),
                float(n) if n >= 3 else None, None, n * 0.5, np.int16(n),
                float(n) if n < 5 else np.array([n, n, n], np.int16)]

    def write(path: Path) -> None:
        with H5File(path, {"general/created": "2026-11-30T00:00:00", "general/user": "test"}, block_rows=2,
                    clock=lambda: 0.0) as h5:
            for n in range(8):
                h5.append(_PARSER.parse(build_message(100 + n, channels(n), values(n),
                                                               timestamp=(1_700_000_000 + n, 0))))

    write(tmp_path / "copied.h5")  # through ctypes where it is available (h5.calls): the fast path
    with monkeypatch.context() as patched:  # the same copies through h5py's calls (the fallback)
        patched.setattr(columns, "CALLS", calls.DatasetCalls("h5py"))
        write(tmp_path / "copied_h5py.h5")
    monkeypatch.setattr(h5_file, "ColumnMaker", lambda decompress: columns.ColumnMaker(decompress, copies=False))
    write(tmp_path / "in_full.h5")
    in_full = _describe(tmp_path / "in_full.h5")
    assert len([name for name in in_full if name.startswith("data/") and name.count("/") == 1]) == 17
    for made in ("copied.h5", "copied_h5py.h5"):
        copied = _describe(tmp_path / made)
        assert sorted(copied) == sorted(in_full), made
        for name in sorted(in_full):
            assert copied[name] == in_full[name], (made, name)
    # The comparison sees one attribute less: a copy that lost one would not pass.
    with h5py.File(tmp_path / "copied.h5", "a") as f:
        del f["data/S1"].attrs["modulo"]
    assert _describe(tmp_path / "copied.h5")["data/S1"] != in_full["data/S1"]


def test_a_template_that_cannot_be_made_costs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kind of channel whose template group HDF5 refuses is made in full instead; it must neither lose
    its values nor block the kinds that come after it (a half-made template once took their names)."""
    build = columns.ColumnMaker._build_template

    def refuse_int8(self, cls, spec, name):
        if spec.type == "int8":
            raise RuntimeError("HDF5 says no")
        return build(self, cls, spec, name)

    monkeypatch.setattr(columns.ColumnMaker, "_build_template", refuse_int8)
    chans = [channel("BAD", "int8"), channel("A", "int32"), channel("B", "uint16"), channel("C", "int8")]
    path = tmp_path / "template.h5"
    with H5File(path) as h5:
        for n in range(3):
            h5.append(message(n, chans, [np.int8(n), np.int32(n), np.uint16(n), np.int8(-n)]))
    with read(path) as f:
        assert {name: f[f"data/{name}/data"][:, 0].tolist() for name in ("BAD", "A", "B", "C")} == {
            "BAD": [0, 1, 2], "A": [0, 1, 2], "B": [0, 1, 2], "C": [0, -1, -2]}
        assert "refused_channels" not in f.attrs or not len(f.attrs["refused_channels"])


def test_display_text_with_nul_or_a_lone_surrogate_keeps_the_channel(tmp_path: Path) -> None:
    """A description, unit or enum label is the sender's text: one HDF5 cannot store as it is (NUL ends
    a C string, a lone surrogate is not UTF-8) is stored with U+FFFD there, never at the cost of the values."""
    odd = dict(channel("X"), description="a\u0000b", unit="m\ud800", enum_strings=["ok", "n\u0000o"])
    path = tmp_path / "display.h5"
    with H5File(path) as h5:
        for n in range(2):
            h5.append(message(n, [odd], [n * 1.5]))
    with read(path) as f:
        assert f["data/X/data"][:, 0].tolist() == [0.0, 1.5]
        assert f["data/X"].attrs["description"] == "a\ufffdb" and f["data/X"].attrs["unit"] == "m\ufffd"
        assert list(f["data/X"].attrs["enum_strings"]) == ["ok", "n\ufffdo"]


def test_scalar_dataset_is_n_by_1(tmp_path: Path) -> None:
    path = tmp_path / "scalar.h5"
    with H5File(path) as h5:
        for pulse_id in range(5):
            h5.append(message(pulse_id, [channel("X")], [pulse_id * 1.5]))
    with read(path) as f:
        assert f["data/X/data"].shape == (5, 1)
        assert list(f["data/X/data"][:, 0]) == [0.0, 1.5, 3.0, 4.5, 6.0]


def test_strings_are_vlen_utf8_and_absent_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "strings.h5"
    values = ["hello", None, "Grüße ✓", "", "x" * 1000]
    with H5File(path) as h5:
        for pulse_id, value in enumerate(values, start=10):
            h5.append(message(pulse_id, [channel("S", "string")], [value]))
    with read(path) as f:
        data = f["data/S/data"]
        assert data.shape == (5,)
        assert h5py.check_string_dtype(data.dtype).encoding == "utf-8"
        assert data.asstr()[:].tolist() == ["hello", "", "Grüße ✓", "", "x" * 1000]
        # An empty string is sent as an empty value part: "no data" on the wire.
        assert list(f["data/S/is_data_present"][:]) == [1, 0, 1, 0, 1]
        assert list(f["data/S/pulse_id"][:]) == [10, 0, 12, 0, 14]


def test_channel_timestamps_in_ns(tmp_path: Path) -> None:
    path = tmp_path / "ts.h5"
    channels = [channel("LE"), channel("BE", encoding="big")]
    with H5File(path) as h5:
        h5.append(message(1, channels, [1.0, 2.0], timestamp=1_700_000_000.25))
        h5.append(message(2, channels, [None, 3.0], timestamp=1_700_000_001.5))
    with read(path) as f:
        assert list(f["data/LE/timestamp"][:]) == [1_700_000_000_250_000_000, 0]
        assert list(f["data/BE/timestamp"][:]) == [1_700_000_000_250_000_000, 1_700_000_001_500_000_000]
        assert f["data/LE/timestamp"].dtype == np.dtype("<i8")
        assert f.attrs["first_timestamp"] == pytest.approx(1_700_000_000.25)
        assert f.attrs["last_timestamp"] == pytest.approx(1_700_000_001.5)


# ------------------------------------------------------------ bitshuffle_lz4


def _image(pulse_id: int, shape: tuple[int, int] = (96, 80), dtype: str = "<u2") -> np.ndarray:
    rng = np.random.default_rng(pulse_id)
    return (rng.poisson(20, size=shape) + pulse_id).astype(dtype)


@pytest.mark.parametrize("dtype", ["<u2", ">f4", "<i8"])
def test_bitshuffle_images_are_stored_as_direct_chunks_without_decompression(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    path = tmp_path / "bslz4.h5"
    type_name = np.dtype(dtype).name
    encoding = "big" if np.dtype(dtype).byteorder == ">" else "little"
    spec = channel("CAM", type_name, (80, 96), encoding, "bitshuffle_lz4")
    messages = [message(pulse_id, [spec], [_image(pulse_id, dtype=dtype)]) for pulse_id in range(500, 510)]
    parts = [bytes(m.value_part(0)) for m in messages]

    def no_decoding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the direct chunk path decoded a value")

    monkeypatch.setattr(columns, "decode_value", no_decoding)
    with H5File(path, block_rows=3) as h5:
        for m in messages:
            h5.append(m)
    monkeypatch.undo()
    with read(path) as f:
        data = f["data/CAM/data"]
        assert data.shape == (10, 96, 80)
        assert data.chunks == (1, 96, 80)
        assert list(data._filters) == ["32008"]  # bitshuffle, the only filter
        assert data._filters["32008"][-1] == 2  # LZ4 mode
        assert data.dtype == np.dtype(dtype)
        for row, pulse_id in enumerate(range(500, 510)):
            np.testing.assert_array_equal(data[row], _image(pulse_id, dtype=dtype))
            filter_mask, stored = data.id.read_direct_chunk((row, 0, 0))
            assert filter_mask == 0 and stored == parts[row]  # the bytes as received
        assert f["data/CAM"].attrs["storage"] == "bitshuffle_lz4 direct chunk"


_PLUGIN_LESS_READER = textwrap.dedent("""
    import sys
    import h5py  # and not hdf5plugin: a reader without the bitshuffle filter (MATLAB, h5dump, plain h5py)
    with h5py.File(sys.argv[1], "r") as f:
        try:
            print(int(f["data/CAM/data"][()].astype("i8").sum()))
        except OSError as error:
            print("unreadable:", error)
""")


@pytest.mark.parametrize("decompress", [False, True], ids=["direct_chunks", "decompressed"])
def test_images_stored_decompressed_open_without_the_plugin(tmp_path: Path, decompress: bool) -> None:
    """--decompress-images: the same values in a plain dataset that any HDF5 reader opens."""
    path = tmp_path / "images.h5"
    spec = channel("CAM", "uint16", (80, 96), "big", "bitshuffle_lz4")
    images = [_image(pulse_id, dtype=">u2") for pulse_id in range(3)]
    with H5File(path, decompress_images=decompress) as h5:
        for pulse_id, image in enumerate(images):
            h5.append(message(pulse_id, [spec], [image]))
    with read(path) as f:
        data = f["data/CAM/data"]
        np.testing.assert_array_equal(data[()], np.stack(images))
        assert list(data._filters) == ([] if decompress else ["32008"])
        # Decompressed values are stored natively; direct chunks keep the byte order they were compressed in.
        assert data.dtype == (np.dtype("=u2") if decompress else np.dtype(">u2"))
        assert f["data/CAM"].attrs["storage"] == ("buffered" if decompress else "bitshuffle_lz4 direct chunk")
    env = {key: value for key, value in os.environ.items() if key != "HDF5_PLUGIN_PATH"}
    result = subprocess.run([sys.executable, "-c", _PLUGIN_LESS_READER, str(path)], env=env, timeout=60,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if decompress:
        assert result.stdout.strip() == str(int(np.stack(images).astype("i8").sum()))
    else:
        assert result.stdout.startswith("unreadable:")  # what the option is for


def _legacy_block_size_part(part: bytes, itemsize: int) -> bytes:
    """The same chunk with the block size field in elements (pre-2018 Python producers)."""
    nbytes, block_bytes = struct.unpack(">QI", part[:12])
    return struct.pack(">QI", nbytes, block_bytes // itemsize) + part[12:]


def test_bitshuffle_fallback_decodes_and_writes_through_filter(tmp_path: Path) -> None:
    path = tmp_path / "fallback.h5"
    spec = channel("CAM", "uint16", (80, 96), "little", "bitshuffle_lz4")
    frames_list = [build_message(p, [spec], [_image(p)], timestamp=1.0 + p) for p in range(3)]
    # Row 1: legacy block size field -> guard says no -> decoded + written through the filter.
    frames_list[1][2] = _legacy_block_size_part(bytes(frames_list[1][2]), 2)
    messages = [_PARSER.parse(frames) for frames in frames_list]
    assert direct_chunk_compatible(messages[0].data_header.channels[0], messages[0].value_part(0))
    assert not direct_chunk_compatible(messages[1].data_header.channels[0], messages[1].value_part(0))
    with H5File(path) as h5:
        for m in messages:
            h5.append(m)
        column = h5._columns["CAM"][("uint16", (96, 80))]
        h5.flush()
        assert column.direct_chunks == 2 and column.filtered_rows == 1
    with read(path) as f:
        for row in range(3):
            np.testing.assert_array_equal(f["data/CAM/data"][row], _image(row))
        # Written through the filter: a valid chunk, not the legacy bytes.
        assert f["data/CAM/data"].id.read_direct_chunk((1, 0, 0))[1] != bytes(frames_list[1][2])


def test_small_bitshuffle_arrays_and_uncompressed_images_are_buffered(tmp_path: Path) -> None:
    path = tmp_path / "small.h5"
    channels = [channel("SMALL", "float64", (16,), compression="bitshuffle_lz4"),
                channel("RAW", "uint16", (80, 96))]
    with H5File(path) as h5:
        for p in range(4):
            h5.append(message(p, channels, [np.arange(16.0) + p, _image(p)]))
    with read(path) as f:
        assert f["data/SMALL"].attrs["storage"] == "buffered"
        assert f["data/SMALL/data"].compression is None
        np.testing.assert_array_equal(f["data/SMALL/data"][3], np.arange(16.0) + 3)
        np.testing.assert_array_equal(f["data/RAW/data"][2], _image(2))
        assert f["data/RAW/data"].shape == (4, 96, 80)


# ------------------------------------------------------ chunking and blocks


def test_chunk_shapes_are_sane() -> None:
    assert layout.chunk_shape((1,), 8) == (1024, 1)
    assert layout.chunk_shape((4096, 4096), 4) == (1, 4096, 4096)  # 64 MiB, far below 4 GiB
    assert layout.chunk_shape((1024, 1280), 2, one_row=True) == (1, 1024, 1280)
    assert layout.chunk_shape((2048,), 8) == (64, 2048)
    huge = layout.chunk_shape((40000, 40000), 8)  # 12.8 GB per row: split within the row
    assert huge[0] == 1 and 8 * np.prod(huge) <= layout.MAX_CHUNK_BYTES


def test_large_image_dataset_has_one_row_chunks(tmp_path: Path) -> None:
    path = tmp_path / "big.h5"
    channels = [channel("BIG", "uint32", (4096, 4096)),
                channel("BIGZ", "uint32", (4096, 4096), compression="bitshuffle_lz4")]
    image = np.zeros((4096, 4096), "<u4")
    image[::7, ::5] = 3
    with H5File(path) as h5:
        h5.append(message(1, channels, [image, image]))
    with read(path) as f:
        assert f["data/BIG/data"].chunks == (1, 4096, 4096)
        assert f["data/BIGZ/data"].chunks == (1, 4096, 4096)
        np.testing.assert_array_equal(f["data/BIGZ/data"][0], image)
        assert f["data/BIG/data"][0, 7, 5] == 3


def test_no_raw_data_chunk_cache_and_blocks_across_chunk_boundaries_read_back(tmp_path: Path) -> None:
    """HDF5's chunk cache only grew with the run (docs/performance.md "Writer: RSS"): H5File has none.

    Blocks of 7 rows straddle the 1024-row chunks of the buffered datasets,
    so every partial-chunk write goes straight to the file and must read back.
    """
    path = tmp_path / "nocache.h5"
    specs = [channel("SCALAR"), channel("TEXT", "string"),
             channel("CAM", "uint16", (64, 64), compression="bitshuffle_lz4")]
    rows = 2100
    with H5File(path, block_rows=7) as h5:
        for pulse_id in range(1, rows + 1):
            h5.append(message(pulse_id, specs, [float(pulse_id), f"p{pulse_id}",
                                                _image(pulse_id, (64, 64))]))
        datasets = []
        h5._file.visititems(lambda name, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
        chunked = [d for d in datasets if d.chunks]
        assert len(chunked) == 12
        for dataset in chunked:
            assert dataset.id.get_access_plist().get_chunk_cache()[1] == h5_file.CHUNK_CACHE_BYTES == 0
    with read(path) as f:
        np.testing.assert_array_equal(f["data/SCALAR/data"][:, 0], np.arange(1, rows + 1, dtype="f8"))
        assert f["data/TEXT/data"].asstr()[-1] == f"p{rows}"
        assert f["data/TEXT/data"].asstr()[1023:1026].tolist() == ["p1024", "p1025", "p1026"]
        np.testing.assert_array_equal(f["data/CAM/pulse_id"][:], np.arange(1, rows + 1))
        np.testing.assert_array_equal(f["data/CAM/data"][rows - 1], _image(rows, (64, 64)))
        assert f["data/CAM"].attrs["storage"] == "bitshuffle_lz4 direct chunk"


def test_ten_thousand_scalar_rows_are_written_in_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "blocks.h5"
    calls: list[int] = []
    original = columns.Column.write_block

    def counting(self: Any, start: int, count: int, pulse_ids: np.ndarray) -> int:
        calls.append(count)
        return original(self, start, count, pulse_ids)

    monkeypatch.setattr(columns.Column, "write_block", counting)
    channels = [channel(f"CH{i}", "int32") for i in range(5)]
    # A clock that never advances: only the block size triggers writes.
    h5 = H5File(path, block_rows=1000, clock=lambda: 0.0)
    frames = [build_message(p, channels, [p + i for i in range(5)], timestamp=float(p)) for p in range(10_000)]
    for f in frames:
        h5.append(_PARSER.parse(f))
    h5.close()
    assert h5.blocks_written == 10
    assert len(calls) == 10 * 5 and set(calls) == {1000}
    assert h5.hdf5_writes == 10 * 5 * 4  # data, pulse_id, is_data_present, timestamp per block
    with read(path) as f:
        np.testing.assert_array_equal(f["data/CH3/data"][:, 0], np.arange(10_000) + 3)
        np.testing.assert_array_equal(f["data/CH3/pulse_id"][:], np.arange(10_000))


def test_flush_interval_and_block_bytes_trigger_writes(tmp_path: Path) -> None:
    now = [0.0]
    h5 = H5File(tmp_path / "interval.h5", flush_interval=1.0, block_rows=10_000, block_bytes=10_000,
                clock=lambda: now[0])
    h5.append(message(1, [channel("X")], [1.0]))
    assert h5.rows == 1 and h5.rows_flushed == 0 and not h5.flush_due()
    now[0] = 1.5
    assert h5.flush_due() and h5.maybe_flush()
    assert h5.rows_flushed == 1
    with read(h5.path) as f:  # readable while open, counts match what is on disk
        assert f.attrs["number_of_messages"] == 1 and f.attrs["complete"] == 0
    image = np.zeros((100, 100), "<u2")
    h5.append(message(2, [channel("X"), channel("IMG", "uint16", (100, 100))], [2.0, image]))  # 20 kB > block
    assert h5.rows_flushed == 2
    h5.close()


# ---------------------------------------------------- channel set changes


def test_channel_first_absent_then_present_keeps_every_value(tmp_path: Path) -> None:
    """The original dropped all values of a channel whose first value was absent."""
    path = tmp_path / "first_absent.h5"
    # The Python sender announces an absent value as float64 [1]; real type follows.
    absent_spec = [channel("A"), channel("LATE")]
    real_spec = [channel("A"), channel("LATE", "uint16", (3, 2))]
    with H5File(path, block_rows=3) as h5:
        for p in range(5):
            h5.append(message(p, absent_spec, [float(p), None]))
        for p in range(5, 9):
            h5.append(message(p, real_spec, [float(p), np.full((2, 3), p, "<u2")]))
    with read(path) as f:
        late = f["data/LATE"]
        assert late["data"].shape == (9, 2, 3) and late["data"].dtype == np.dtype("<u2")
        assert list(late["is_data_present"][:]) == [0] * 5 + [1] * 4
        assert list(late["pulse_id"][:]) == [0] * 5 + [5, 6, 7, 8]
        assert (late["data"][:5] == 0).all()
        for row in range(5, 9):
            assert (late["data"][row] == row).all()
        assert "LATE@2" not in f["data"]  # the absent announcement is not a type


def test_channel_absent_with_unchanged_header_then_present(tmp_path: Path) -> None:
    path = tmp_path / "same_header.h5"
    spec = [channel("A", "int16"), channel("B", "int16")]
    with H5File(path, block_rows=2) as h5:
        for p in range(6):
            h5.append(message(p, spec, [p, p if p >= 3 else None]))
    with read(path) as f:
        assert list(f["data/B/data"][:, 0]) == [0, 0, 0, 3, 4, 5]
        assert list(f["data/B/is_data_present"][:]) == [0, 0, 0, 1, 1, 1]


def test_channel_never_present_exists_all_absent(tmp_path: Path) -> None:
    path = tmp_path / "never.h5"
    with H5File(path) as h5:
        for p in range(3):
            h5.append(message(p, [channel("A"), channel("NEVER", "int32", (4,))], [1.0, None]))
    with read(path) as f:
        assert f["data/NEVER/data"].shape == (3, 4)
        assert list(f["data/NEVER/is_data_present"][:]) == [0, 0, 0]


def test_channel_added_and_removed_mid_run(tmp_path: Path) -> None:
    path = tmp_path / "added_removed.h5"
    before = [channel("KEEP"), channel("GONE", "int32")]
    after = [channel("KEEP"), channel("NEW", "string")]
    with H5File(path, block_rows=4) as h5:
        for p in range(100, 106):
            h5.append(message(p, before, [float(p), p]))
        for p in range(106, 110):
            h5.append(message(p, after, [float(p), f"n{p}"]))
    with read(path) as f:
        data = f["data"]
        assert sorted(data) == ["GONE", "KEEP", "NEW"]
        for name in data:
            assert data[name]["data"].shape[0] == 10 and data[name]["pulse_id"].shape == (10,)
        assert list(data["KEEP/pulse_id"][:]) == list(range(100, 110))
        assert list(data["GONE/pulse_id"][:]) == list(range(100, 106)) + [0] * 4
        assert list(data["GONE/data"][:, 0]) == list(range(100, 106)) + [0] * 4
        assert list(data["NEW/pulse_id"][:]) == [0] * 6 + list(range(106, 110))
        assert data["NEW/data"].asstr()[:].tolist() == [""] * 6 + [f"n{p}" for p in range(106, 110)]


def test_channel_retyped_and_reshaped_mid_run_ends_in_the_originals_layout(tmp_path: Path) -> None:
    """The newest type under data, older ones as data(1), data(2)...; one presence, pulse_id, timestamp."""
    path = tmp_path / "retyped.h5"
    float_spec = [channel("OTHER"), channel("X")]
    int_spec = [channel("OTHER"), channel("X", "int32")]
    wave_spec = [channel("OTHER"), channel("X", "int32", (3,))]
    with H5File(path, block_rows=2) as h5:
        h5.append(message(1, float_spec, [1.0, 1.5], timestamp=1_700_000_001))
        h5.append(message(2, int_spec, [2.0, 2], timestamp=1_700_000_002))
        h5.append(message(3, wave_spec, [3.0, np.array([3, 4, 5], "<i4")], timestamp=1_700_000_003))
        h5.append(message(4, float_spec, [4.0, 4.5], timestamp=1_700_000_004))  # the first type: newest again
        h5.append(message(5, int_spec, [5.0, None], timestamp=1_700_000_005))
    with read(path) as f:
        data = f["data"]
        assert sorted(data) == ["OTHER", "X"]
        x = data["X"]
        assert sorted(x) == ["data", "data(1)", "data(2)", "data_variant", "is_data_present", "pulse_id",
                             "timestamp"]
        # data: the type of the last present value, every row.
        assert x["data"].dtype == np.dtype("<f8") and x["data"].shape == (5, 1)
        assert list(x["data"][:, 0]) == [1.5, 0, 0, 4.5, 0]
        # data(1), data(2): older types by their last value, cut where the next one took over.
        assert x["data(1)"].dtype == np.dtype("<i4") and x["data(1)"][()].tolist() == [[0], [2]]
        assert x["data(2)"][()].tolist() == [[0, 0, 0], [0, 0, 0], [3, 4, 5]]
        assert list(x["is_data_present"][()]) == [1, 1, 1, 1, 0]
        assert list(x["pulse_id"][()]) == [1, 2, 3, 4, 0]
        assert list(x["timestamp"][()]) == [(1_700_000_000 + p) * 10**9 for p in (1, 2, 3, 4)] + [0]
        assert list(x["data_variant"][()]) == [0, 1, 2, 0, 0]
        # The group describes data; every data dataset describes itself.
        assert x.attrs["type"] == "float64" and "variants" not in x.attrs and "variant" not in x.attrs
        assert x["data(1)"].attrs["type"] == "int32" and list(x["data(2)"].attrs["shape"]) == [3]
        assert x["data"].attrs["type"] == "float64" and x["data(2)"].attrs["name"] == "X"
        assert "data_variant" not in data["OTHER"]


def test_a_type_change_reads_like_the_originals_file(tmp_path: Path) -> None:
    """The original's own integration scenario: 10 scalars, then arrays of 3 -> data(1) 10 rows, data 30."""
    path = tmp_path / "changing.h5"
    with H5File(path) as h5:
        for pulse_id in range(30):
            value: Any = pulse_id if pulse_id < 10 else np.array([pulse_id] * 3, "<i8")
            h5.append(message(pulse_id, [channel("changing_source", "int64", (1,) if pulse_id < 10 else (3,))],
                              [value]))
    with read(path) as f:
        x = f["data/changing_source"]
        assert len(x["data(1)"]) == 10 and len(x["data"]) == 30
        assert x["data(1)"][:, 0].tolist() == list(range(10))
        assert x["data"][10:].tolist() == [[p] * 3 for p in range(10, 30)]
        assert not x["data"][:10].any()
        assert x["is_data_present"][()].all() and list(x["pulse_id"][()]) == list(range(30))
        assert list(x["data_variant"][()]) == [1] * 10 + [0] * 20


@pytest.mark.parametrize("presence, order, lengths, variant_of_row", [
    # A -> B: the original's numbering (A = data(1), cut where B began).
    ([[1, 1, 0, 0], [0, 0, 1, 1]], (0, 1), (2, 4), [1, 1, 0, 0]),
    # absent rows between the types: data(1) ends where B's first value is, not after A's last.
    ([[1, 0, 0, 0, 0], [0, 0, 0, 1, 0]], (0, 1), (3, 5), [1, 0, 0, 0, 0]),
    # A -> B -> A: A is the newest; B is cut where A came back.
    ([[1, 0, 1], [0, 1, 0]], (1, 0), (2, 3), [0, 1, 0]),
    # A -> B -> C
    ([[1, 0, 0], [0, 1, 0], [0, 0, 1]], (0, 1, 2), (1, 2, 3), [1, 2, 0]),
    # a variant with no value left (a late stop removed them): the oldest, data(1) with no row.
    ([[1, 1], [0, 0]], (1, 0), (0, 2), [0, 0]),
], ids=["a_then_b", "gap_between", "a_b_a", "a_b_c", "emptied"])
def test_plan_merge_orders_and_cuts_like_the_original(presence: list[list[int]], order: tuple[int, ...],
                                                      lengths: tuple[int, ...], variant_of_row: list[int]) -> None:
    plan = variants.plan_merge([np.array(p, dtype="u1") for p in presence])
    assert (plan.order, plan.lengths, plan.variant_of_row.tolist()) == (order, lengths, variant_of_row)
    for index, row_flags in enumerate(presence):  # nothing present is ever cut
        kept = plan.lengths[plan.order.index(index)]
        assert not any(row_flags[kept:])


def test_plan_merge_refuses_what_cannot_be_a_channel() -> None:
    with pytest.raises(ValueError):
        variants.plan_merge([])
    with pytest.raises(ValueError):
        variants.plan_merge([np.zeros(3, "u1"), np.zeros(2, "u1")])


def _child_env(**extra: str) -> dict[str, str]:
    """The environment of a child writer: this checkout first on the path, one BLAS thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


_RETYPE_CHILD = textwrap.dedent("""
    import os, signal, sys
    import h5py
    from sf_bsread_writer.bsread.codecs import direct_chunk_compatible
    from sf_bsread_writer.bsread.message import Message, MessageParser
    from sf_bsread_writer.bsread.build import build_message
    from sf_bsread_writer.h5.file import H5File
    path, when = sys.argv[1], sys.argv[2]
    parser = MessageParser()
    h5 = H5File(path, {"general/user": "kill-test"})
    for pulse_id in range(1, 7):
        spec = {"name": "X", "type": "float64" if pulse_id < 4 else "int32", "shape": [1]}
        h5.append(parser.parse(build_message(pulse_id, [spec], [pulse_id + 0.5 if pulse_id < 4 else pulse_id],
                                                      timestamp=1_700_000_000 + pulse_id)))
    h5.flush()
    if when == "before_close":
        os.kill(os.getpid(), signal.SIGKILL)
    moves = []
    original_move = h5py.Group.move
    def move_then_die(self, source, dest):
        original_move(self, source, dest)
        moves.append(dest)
        if len(moves) == 2:  # both data datasets staged, none in place yet
            os.kill(os.getpid(), signal.SIGKILL)
    h5py.Group.move = move_then_die
    h5.close()
""")


@pytest.mark.parametrize("when", ["before_close", "mid_merge"])
def test_a_killed_file_with_a_type_change_keeps_the_writing_layout(tmp_path: Path, when: str) -> None:
    """Until the close merges them, a changed channel's types are in sibling groups: each one whole."""
    path = tmp_path / "killed-retyped.h5"
    result = subprocess.run([sys.executable, "-c", _RETYPE_CHILD, str(path), when], env=_child_env(), timeout=60,
                            capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    _wait_for_the_guardian(path)
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"] == 0 and f.attrs["number_of_messages"] == 6
        assert sorted(f["data"]) == ["X", "X@2"]
        first, second = f["data/X"], f["data/X@2"]
        assert first["data"][:, 0].tolist() == [1.5, 2.5, 3.5, 0, 0, 0]
        assert second["data"][:, 0].tolist() == [0, 0, 0, 4, 5, 6] and second["data"].dtype == np.dtype("<i4")
        assert list(first.attrs["variants"]) == ["X", "X@2"]
        assert second.attrs["channel"] == "X" and second.attrs["variant"] == 2
        assert list(first["is_data_present"][()] + second["is_data_present"][()]) == [1] * 6


def test_byte_order_or_compression_change_is_not_a_retype(tmp_path: Path) -> None:
    path = tmp_path / "order.h5"
    with H5File(path) as h5:
        h5.append(message(1, [channel("X", "int32", (2,))], [np.array([1, 2])]))
        h5.append(message(2, [channel("X", "int32", (2,), "big")], [np.array([3, 4])]))
        h5.append(message(3, [channel("X", "int32", (2,), compression="bitshuffle_lz4")], [np.array([5, 6])]))
    with read(path) as f:
        assert list(f["data"]) == ["X"]
        assert f["data/X/data"][:].tolist() == [[1, 2], [3, 4], [5, 6]]


def test_rows_are_aligned_across_channels(tmp_path: Path) -> None:
    path = tmp_path / "aligned.h5"
    channels = [channel("EVERY"), channel("ODD", "int8"), channel("IMG", "uint16", (80, 96),
                                                                   compression="bitshuffle_lz4"),
                channel("S", "string")]
    pulse_ids = list(range(2000, 2050, 2))
    with H5File(path, block_rows=7) as h5:
        for p in pulse_ids:
            odd = (p // 2) % 2 == 1
            h5.append(message(p, channels, [float(p), 1 if odd else None, _image(p) if p % 3 else None,
                                            str(p) if p % 5 else None]))
    with read(path) as f:
        every = f["data/EVERY/pulse_id"][:]
        assert list(every) == pulse_ids
        for name in ("ODD", "IMG", "S"):
            pid = f[f"data/{name}/pulse_id"][:]
            present = f[f"data/{name}/is_data_present"][:]
            assert len(pid) == len(pulse_ids) == len(f[f"data/{name}/data"])
            assert ((pid == every) == (present == 1)).all()
            assert (pid[present == 0] == 0).all()
        for row, p in enumerate(pulse_ids):
            if p % 3:
                np.testing.assert_array_equal(f["data/IMG/data"][row], _image(p))
            else:
                assert not f["data/IMG/data"][row].any()


def test_broken_value_is_recorded_absent_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "broken.h5"
    spec = channel("IMG", "uint16", (80, 96), compression="bitshuffle_lz4")
    good = build_message(1, [spec], [_image(1)], timestamp=1.0)
    bad = build_message(2, [spec], [_image(2)], timestamp=2.0)
    bad[2] = struct.pack(">QI", 3, 8192) + b"\x00garbage"
    with H5File(path) as h5:
        h5.append(_PARSER.parse(good))
        h5.append(_PARSER.parse(bad))
    with read(path) as f:
        assert list(f["data/IMG/is_data_present"][:]) == [1, 0]
        np.testing.assert_array_equal(f["data/IMG/data"][0], _image(1))


def test_wrong_size_scalar_is_absent_and_the_rest_of_the_row_is_kept(tmp_path: Path) -> None:
    """A packed (uncompressed, fixed size) value of the wrong size takes the slow path for its row."""
    path = tmp_path / "wrong_size.h5"
    channels = [channel("A", "int32"), channel("B", "int32"), channel("C", "float64", encoding="big")]
    frames = [build_message(p, channels, [p, 10 * p, p / 2], timestamp=float(p)) for p in range(1, 6)]
    frames[2][4] = b"\x01\x02"  # B of pulse 3: 2 bytes for an int32
    with H5File(path) as h5:
        for f in frames:
            h5.append(_PARSER.parse(f))
    with read(path) as f:
        assert list(f["data/A/data"][:, 0]) == [1, 2, 3, 4, 5]
        assert list(f["data/B/data"][:, 0]) == [10, 20, 0, 40, 50]
        assert list(f["data/B/is_data_present"][:]) == [1, 1, 0, 1, 1]
        assert list(f["data/C/data"][:, 0]) == [0.5, 1.0, 1.5, 2.0, 2.5]
        assert list(f["data/C/timestamp"][:]) == [p * 1_000_000_000 for p in range(1, 6)]


# ------------------------------------------------- missing, attributes, close


def test_missing_pulses_have_one_owner_whose_list_the_file_writes(tmp_path: Path) -> None:
    """missing_from: /missing and ``missing_pulses`` are the owner's list as it is at each flush and at close;
    what was only appended is appended, a list changed otherwise (clipped by a late stop) is the table again."""
    path = tmp_path / "owned.h5"
    h5 = H5File(path, flush_interval=1e9)
    owner = {"missing": [MissingRange(2, 4, 3, "pulse_id_jump")]}
    h5.missing_from(lambda: owner["missing"])
    with pytest.raises(RuntimeError, match="owner"):
        h5.record_missing(7, 7, "evicted")  # a second list would drift from the owner's
    h5.append(message(1, [channel("X")], [1.0]))
    assert h5.flush_due() is False  # the interval has not passed
    h5.flush()
    owner["missing"].append(MissingRange(6, 9, 4, "evicted"))
    h5.flush()
    with read(path) as f:
        assert f["missing"][()].tolist() == [(2, 4, 3, b"pulse_id_jump"), (6, 9, 4, b"evicted")]
        assert f.attrs["missing_pulses"] == 7
    owner["missing"] = [MissingRange(2, 4, 3, "pulse_id_jump"), MissingRange(6, 7, 2, "evicted")]  # clipped
    assert h5.missing == owner["missing"] and h5.missing_pulses == 5
    with pytest.raises(ValueError, match="owner"):
        h5.truncate(1, missing=[])
    h5.close()
    with read(path) as f:
        assert f["missing"][()].tolist() == [(2, 4, 3, b"pulse_id_jump"), (6, 7, 2, b"evicted")]
        assert f.attrs["missing_pulses"] == 5


def test_missing_pulses_table_and_file_attributes(tmp_path: Path) -> None:
    path = tmp_path / "missing.h5"
    h5 = H5File(path)
    h5.set_attributes({"requested_start_pulse_id": 100, "requested_stop_pulse_id": 120,
                       "requested_start_time": None})
    for p in (100, 101, 105, 106):
        h5.append(message(p, [channel("X")], [1.0]))
    h5.record_missing(102, 104, "ring_overrun")
    h5.record_missing(110, 120, "source_silent", count=6)
    assert h5.missing_pulses == 9
    h5.close({"end_reason": "stop_reached", "unlocated_gaps": [{"count": 3, "reason": "evicted"}]})
    with read(path) as f:
        table = f["missing"][:]
        assert table["first_pulse_id"].tolist() == [102, 110]
        assert table["last_pulse_id"].tolist() == [104, 120]
        assert table["count"].tolist() == [3, 6]
        assert [r.decode() for r in table["reason"]] == ["ring_overrun", "source_silent"]
        attrs = f.attrs
        assert attrs["missing_pulses"] == 9
        assert attrs["requested_start_pulse_id"] == 100 and attrs["requested_stop_pulse_id"] == 120
        assert "requested_start_time" not in attrs
        assert attrs["first_pulse_id"] == 100 and attrs["last_pulse_id"] == 106
        assert attrs["number_of_messages"] == 4 and attrs["complete"] == 1
        assert attrs["end_reason"] == "stop_reached"
        assert attrs["unlocated_gaps"] == '[{"count": 3, "reason": "evicted"}]'


def test_close_is_idempotent_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "close.h5"
    h5 = H5File(path)
    h5.append(message(1, [channel("X"), channel("Y", "int8", (4,))], [1.0, np.arange(4)]))
    assert h5.rows == 1 and h5.bytes_written == 8 + 4
    assert h5.channels == ["X", "Y"]
    h5.close({"requested_stop_pulse_id": 1})
    h5.close()
    h5.close({"ignored": 1})
    assert h5.closed
    with pytest.raises(ValueError):
        h5.append(message(2, [channel("X")], [2.0]))
    with read(path) as f:
        assert f.attrs["requested_stop_pulse_id"] == 1 and "ignored" not in f.attrs


# --------------------------------------------------------------- kill -9

_CHILD = textwrap.dedent("""
    import os, sys
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    from sf_bsread_writer.bsread.codecs import direct_chunk_compatible
    from sf_bsread_writer.bsread.message import Message, MessageParser
    from sf_bsread_writer.bsread.build import build_message
    from sf_bsread_writer.h5.file import H5File
    path, first = sys.argv[1], int(sys.argv[2])
    channels = [
        {"name": f"S{i}", "type": "float64", "shape": [1]} for i in range(20)
    ] + [
        {"name": "WAVE", "type": "int32", "shape": [256]},
        {"name": "TEXT", "type": "string", "shape": [1]},
        {"name": "CAM", "type": "uint16", "shape": [128, 96], "compression": "bitshuffle_lz4"},
    ]
    parser = MessageParser()
    image = (np.arange(96 * 128) % 1000).astype("<u2").reshape(96, 128)
    flush_interval, block_rows = (float(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 3 else (0.05, 50)
    h5 = H5File(path, {"general/user": "kill-test"}, flush_interval=flush_interval, block_rows=block_rows)
    h5.set_attributes({"requested_start_pulse_id": first})
    print("opened", flush=True)
    flushes = 0
    pulse_id = first
    while True:
        values = [pulse_id * 0.5 + i for i in range(20)] + [
            np.arange(256, dtype="<i4") + pulse_id % 100_000, f"p{pulse_id}", image + (pulse_id % 1000)]
        h5.append(parser.parse(build_message(pulse_id, channels, values, timestamp=pulse_id / 100)))
        pulse_id += 1
        if h5.flushes != flushes:
            flushes = h5.flushes
            print("flushed", h5.rows_flushed, flush=True)
""")


def _check_killed_file(path: Path, first: int, flushed_at_least: int) -> int:
    """The file opens with plain h5py and its first number_of_messages rows are complete."""
    with h5py.File(path, "r") as f:
        rows = int(f.attrs["number_of_messages"])
        assert f.attrs["complete"] == 0
        assert rows >= flushed_at_least
        assert f["general/user"][()] == b"kill-test"
        expected_pulse_ids = np.arange(first, first + rows)
        for name in [f"S{i}" for i in range(20)] + ["WAVE", "TEXT", "CAM"]:
            group = f["data"][name]
            for dataset in ("data", "pulse_id", "is_data_present", "timestamp"):
                assert group[dataset].shape[0] >= rows, (name, dataset)
            np.testing.assert_array_equal(group["pulse_id"][:rows], expected_pulse_ids)
            assert (group["is_data_present"][:rows] == 1).all()
        for i in (0, 19):
            np.testing.assert_array_equal(f[f"data/S{i}/data"][:rows, 0], expected_pulse_ids * 0.5 + i)
        np.testing.assert_array_equal(f["data/WAVE/data"][:rows, -1], expected_pulse_ids % 100_000 + 255)
        assert f["data/TEXT/data"].asstr()[:rows].tolist() == [f"p{p}" for p in expected_pulse_ids]
        image = (np.arange(96 * 128) % 1000).astype("<u2").reshape(96, 128)
        for row in sorted({0, rows // 2, rows - 1}):
            if rows:
                np.testing.assert_array_equal(f["data/CAM/data"][row], image + (first + row) % 1000)
    return rows


def _wait_for_the_guardian(path: Path) -> None:
    """A killed writer's guardian has undone (and removed) the journal of ``path``: only now is the file final."""
    journal = path.parent / f".{path.name}.journal"
    wait_for(lambda: not journal.exists(), timeout=20, message=f"the guardian to undo and remove {journal}")


@contextlib.contextmanager
def _killable_child(path: Path, first: int, *options: str) -> Iterator[subprocess.Popen]:
    """The _CHILD writer, killed with SIGKILL by the test (``_kill_9``) and cleaned up whatever happens.

    On leaving, the killed writer's guardian has finished with the file.
    """
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(first), *options], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_child_env(PYTHONUNBUFFERED="1"))
    try:
        line = child.stdout.readline()
        assert line.startswith("opened"), (line, child.stderr.read() if child.poll() is not None else "")
        yield child
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    _wait_for_the_guardian(path)


def _kill_9(child: subprocess.Popen, delay: float) -> None:
    time.sleep(delay)  # not synchronisation: the kill lands at a different moment of the appends or flushes
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.parametrize("delay", [0.0, 0.002, 0.02, 0.2])
def test_kill_9_before_the_first_flush_leaves_a_readable_empty_file(tmp_path: Path, delay: float) -> None:
    """The first second of a run: rows wait for the first flush, yet the file on disk is already whole."""
    path = tmp_path / "killed-early.h5"
    with _killable_child(path, 5, "30.0", "1000000") as child:  # no flush by time or block size
        _kill_9(child, delay)
    with h5py.File(path, "r") as f:
        assert int(f.attrs["number_of_messages"]) == 0 and f.attrs["complete"] == 0
        assert f.attrs["format_version"] == layout.FORMAT_VERSION
        assert f["general/user"][()] == b"kill-test"
        assert "data" in f
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left beside it


def test_kill_9_while_the_file_is_created_leaves_no_file_at_its_path(tmp_path: Path) -> None:
    """Killed between creating the file and giving it its name: nothing unreadable where the DAQ looks."""
    path = tmp_path / "never-named.h5"
    script = textwrap.dedent("""
        import os, signal, sys
        from sf_bsread_writer.h5 import placement
        from sf_bsread_writer.h5.file import H5File
        placement.FileSlot.publish = lambda self: os.kill(os.getpid(), signal.SIGKILL)
        H5File(sys.argv[1], {"general/user": "kill-test"})
    """)
    result = subprocess.run([sys.executable, "-c", script, str(path)], env=_child_env(), timeout=60,
                            capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    _wait_for_the_guardian(path)
    assert not path.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".sf_bsread_writer.") and leftovers[0].endswith(".creating")


@pytest.mark.parametrize("flushes_before_kill, extra_delay", [(1, 0.0), (3, 0.013), (10, 0.031), (25, 0.047)])
def test_kill_9_leaves_a_readable_file_with_data_up_to_the_last_flush(
        tmp_path: Path, flushes_before_kill: int, extra_delay: float) -> None:
    path = tmp_path / "killed.h5"
    first = 20_000_000_000
    with _killable_child(path, first) as child:
        flushed = 0
        for _ in range(flushes_before_kill):
            line = child.stdout.readline()
            assert line.startswith("flushed"), (line, child.stderr.read() if child.poll() is not None else "")
            flushed = int(line.split()[1])
        _kill_9(child, extra_delay)  # at a different phase: mid-append or mid-flush
    rows = _check_killed_file(path, first, flushed)
    assert rows >= flushed > 0


# ------------------------------------------------- kill -9 at every moment of a flush and of the close

# One process that has imported everything forks one writer per kill point (a fork costs milliseconds, a fresh
# interpreter with h5py a second on a loaded machine). Each writer writes _KILL_FLUSHES blocks of _KILL_BLOCK
# rows of _CHILD's channels into its own file (the camera's chunk index splits: a v1 B-tree node holds 64
# chunks), prints after every completed flush, and SIGKILLs itself at the N-th write HDF5 makes through the
# file object during the chosen flush (0: the close, which also writes a last block). A first writer that is not killed counts those writes;
# the kill points are the first and last three and an even spread between.
_KILL_BLOCK, _KILL_FLUSHES = 40, 4
_KILL_POINTS_CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from sf_bsread_writer.bsread.message import MessageParser
    from sf_bsread_writer.bsread.build import build_message
    from sf_bsread_writer.h5.file import H5File
    from sf_bsread_writer.h5.guardian import guardian_pid
    def say(*words):  # one write per line: the guardians' log lines share the pipe
        os.write(1, (" ".join(map(str, words)) + "\\n").encode())
    directory, journal, target, spread = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
    first, block, flushes, orphan = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), sys.argv[8] == "orphan"
    channels = [{"name": f"S{i}", "type": "float64", "shape": [1]} for i in range(20)] + [
        {"name": "WAVE", "type": "int32", "shape": [256]}, {"name": "TEXT", "type": "string", "shape": [1]},
        {"name": "CAM", "type": "uint16", "shape": [128, 96], "compression": "bitshuffle_lz4"}]
    parser = MessageParser()
    image = (np.arange(96 * 128) % 1000).astype("<u2").reshape(96, 128)
    messages = [parser.parse(build_message(pulse_id, channels, [pulse_id * 0.5 + i for i in range(20)] + [
        np.arange(256, dtype="<i4") + pulse_id % 100_000, f"p{pulse_id}", image + (pulse_id % 1000)],
        timestamp=pulse_id / 100)) for pulse_id in range(first, first + block * (flushes + 1))]

    def write(path, kill_at):
        h5 = H5File(path, {"general/user": "kill-test"}, flush_interval=1e9, block_rows=10**6, journal=journal)
        say("guardian", path, guardian_pid())
        io, writes = h5._io, [0]
        original = io.write
        def counted(data):
            writes[0] += 1
            if writes[0] == kill_at:
                if orphan:  # the guardian first (it is our child): nobody undoes the journal
                    os.kill(guardian_pid(), signal.SIGKILL)
                    os.waitpid(guardian_pid(), 0)
                os.kill(os.getpid(), signal.SIGKILL)
            return original(data)
        for flush in range(1, flushes + 1):
            for message in messages[(flush - 1) * block:flush * block]:
                h5.append(message)
            if flush == target:
                io.write = counted
            h5.flush()
            io.__dict__.pop("write", None)
            say("flushed", path, h5.rows_flushed)
        for message in messages[flushes * block:]:  # a last block, written by the close only
            h5.append(message)
        if target == 0:
            io.write = counted
        h5.close()
        return writes[0]

    def forked(path, kill_at, report):
        pid = os.fork()
        if pid == 0:
            try:
                os.write(report, b"%d" % write(path, kill_at))
            finally:
                os._exit(0)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    read_end, write_end = os.pipe()
    assert forked(os.path.join(directory, "count.h5"), 0, write_end) == 0
    writes = int(os.read(read_end, 100))
    points = sorted({1, 2, 3, writes - 2, writes - 1, writes} | {1 + i * writes // spread for i in range(spread)})
    say("writes", writes)
    for kill_at in points:
        path = os.path.join(directory, f"killed-{kill_at}.h5")
        say("killed", path, kill_at, forked(path, kill_at, write_end))
    say("done")
""")


def _kill_points(directory: Path, journal: bool, target: int, spread: int,
                 orphan: bool = False, core: str = "compiled") -> tuple[int, dict[Path, int]]:
    """Run _KILL_POINTS_CHILD: the writes of the target flush, and {file killed: rows of its last completed flush}.

    ``orphan``: each writer kills its guardian (and waits for its end) just before itself. ``core``: the
    implementation of the file object's I/O and journaling (h5.journaled.IMPLEMENTATIONS).
    """
    if core not in journaled.IMPLEMENTATIONS:
        pytest.skip(f"the compiled journaled I/O is not built: {journaled.FALLBACK_REASON}")
    extra = {} if core == "compiled" else {journaled.NO_EXTENSION_VARIABLE: "1"}
    first = 30_000_000_000
    child = Child([sys.executable, "-c", _KILL_POINTS_CHILD, str(directory), "1" if journal else "0", str(target),
                   str(spread), str(first), str(_KILL_BLOCK), str(_KILL_FLUSHES), "orphan" if orphan else "guarded"],
                  env=_child_env(**extra))
    with child:
        writes = int(child.wait_for_line("writes ", timeout=60).split()[1])
        child.wait_for_line("done", timeout=120)
        lines = list(child.lines)
    flushed: dict[str, int] = {}
    killed: dict[Path, int] = {}
    for line in lines:
        words = line.split()
        if words[:1] == ["flushed"]:
            flushed[words[1]] = int(words[2])
        elif words[:1] == ["killed"]:
            assert words[3] == str(-signal.SIGKILL), line  # killed at that write, not ended otherwise
            killed[Path(words[1])] = flushed.get(words[1], 0)
    return writes, killed


def _check_rows(path: Path, first: int, rows: int) -> None:
    """``path`` opens with plain h5py, counts exactly ``rows`` rows and they read back exactly."""
    assert _check_killed_file(path, first, rows) == rows


@pytest.mark.parametrize("target, core", [(2, "compiled"), (4, "compiled"), (0, "compiled"), (4, "python")],
                         ids=["flush-2", "flush-4", "close", "flush-4-python-core"])
def test_a_kill_at_any_write_of_a_flush_or_the_close_leaves_the_rows_of_the_last_flush(
        tmp_path: Path, target: int, core: str) -> None:
    """The CI case (``addr overflow`` after a kill mid-flush), at every moment: the guardian undoes the journal."""
    writes, killed = _kill_points(tmp_path, True, target, 12, core=core)
    assert writes > 50 and len(killed) >= 12
    for path, rows in killed.items():
        _wait_for_the_guardian(path)
        try:
            _check_rows(path, 30_000_000_000, rows)
        except Exception as error:
            raise AssertionError(f"{path.name} (of {writes} writes), expected {rows} rows: {error!r}") from error
        assert rows == _KILL_BLOCK * ((target or _KILL_FLUSHES + 1) - 1)


def test_a_writer_and_guardian_both_killed_leave_a_journal_that_sf_bsread_ctl_repair_applies(tmp_path: Path) -> None:
    """kill -9 of both: the journal stays, a new writer of the path refuses (naming the repair), repair restores."""
    _, killed = _kill_points(tmp_path, True, 2, 1, orphan=True)
    unreadable = 0
    for path in killed:
        assert (path.parent / f".{path.name}.journal").exists(), path  # nobody undid it
        try:
            _check_rows(path, 30_000_000_000, killed[path])
        except Exception:  # noqa: BLE001 (some kill points leave a file that does not open: what repair is for)
            unreadable += 1
    assert unreadable, "no kill point left a broken file: the test no longer shows what repair is for"
    path = next(iter(killed))
    with pytest.raises(FileExistsError, match=r"sf_bsread_ctl repair .*killed-"):
        H5File(path.parent / path.name, {"general/user": "again"})
    result = subprocess.run([sys.executable, "-m", "sf_bsread_writer.tools.ctl", "repair", *map(str, killed),
                             str(tmp_path / "never-written.h5")], env=_child_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "back to its last completed flush" in result.stdout and "nothing to repair" in result.stdout
    for path, rows in killed.items():
        assert not (path.parent / f".{path.name}.journal").exists()
        _check_rows(path, 30_000_000_000, rows)


def test_repair_leaves_a_journal_in_use_alone(tmp_path: Path) -> None:
    """A writer (or its guardian) holds its journal's lock: repair refuses rather than undo a file being written."""
    from sf_bsread_writer.h5.journaled import JournalInUse, repair

    path = tmp_path / "busy.h5"
    with H5File(path, {"general/user": "busy"}, guardian=False) as h5:
        h5.append(message(1, [channel("X")], [1.0]))
        h5.flush()
        with pytest.raises(JournalInUse, match="in use"):
            repair(path)
    assert repair(path) is None  # closed: the journal is gone, nothing to do
    with read(path) as f:
        assert f.attrs["number_of_messages"] == 1 and f.attrs["complete"] == 1


def test_a_close_that_fails_leaves_the_file_of_the_last_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HDF5's close stopped half way (here: every write after the 3rd of the close fails): undone in-process."""
    path = tmp_path / "failed-close.h5"
    h5 = H5File(path, {"general/user": "close"})
    for pulse_id in range(1, 11):
        h5.append(message(pulse_id, [channel("X"), _CAM], [pulse_id * 1.0, _image(pulse_id, (96, 80))]))
    h5.flush()
    for pulse_id in range(11, 101):  # the close writes these and splits the camera's chunk index
        h5.append(message(pulse_id, [channel("X"), _CAM], [pulse_id * 1.0, _image(pulse_id, (96, 80))]))
    io, original, writes = h5._io, h5._io.write, [0]

    def failing(data: memoryview) -> int:
        writes[0] += 1
        if writes[0] > 3:
            raise OSError(5, "Input/output error (injected)")
        return original(data)

    io.write = failing
    with pytest.raises(Exception):
        h5.close()
    assert not (tmp_path / f".{path.name}.journal").exists()
    with read(path) as f:
        assert f.attrs["number_of_messages"] == 10 and f.attrs["complete"] == 0
        np.testing.assert_array_equal(f["data/X/data"][:10, 0], np.arange(1, 11))
        np.testing.assert_array_equal(f["data/CAM/data"][9], _image(10, (96, 80)))


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_a_guardian_started_for_another_user_switches_at_once_and_still_undoes(tmp_path: Path) -> None:
    """The writer that drops its privileges starts its guardian before (as root): it runs as that user, whole.

    After the switch not even the interpreter's library may be readable (a pyenv Python under /root, as here):
    everything the guardian needs is imported before it switches.
    """
    import tempfile

    from sf_bsread_writer.h5 import guardian as guardian_module

    nobody = 65534
    shared = Path(tempfile.mkdtemp(prefix="sf_bsread_writer_test_"))
    shared.chmod(0o777)
    guardian = guardian_module.Guardian()
    try:
        (shared / "data.h5").write_bytes(b"CORRUPTED-AND-LONGER")
        header = journal.encode_header(9)
        (shared / ".data.h5.journal").write_bytes(header + journal.encode_record(0, b"committed", journal.record_seed(header)))
        directory_fd = os.open(shared, os.O_RDONLY | os.O_DIRECTORY)
        file_fd = os.open(shared / "data.h5", os.O_RDWR)
        journal_fd = os.open(shared / ".data.h5.journal", os.O_RDWR)
        try:
            guardian.start(run_as=(nobody, nobody, [nobody]))
            guardian.watch(directory_fd, file_fd, journal_fd, ".data.h5.journal", str(shared / "data.h5"))
            pid = guardian.pid
            wait_for(lambda: f"\t{nobody}\t" in _status_line(pid, "Uid:"), timeout=20, message="the switch")
        finally:
            for fd in (directory_fd, file_fd, journal_fd):
                os.close(fd)
        guardian._drop()  # this "writer" ends: the guardian reads end-of-file
        wait_for(lambda: not (shared / ".data.h5.journal").exists(), timeout=20, message="the undo")
        assert (shared / "data.h5").read_bytes() == b"committed"
    finally:
        guardian._drop()
        shutil.rmtree(shared, ignore_errors=True)


def _status_line(pid: int, key: str) -> str:
    try:
        return next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(key))
    except (OSError, StopIteration):
        return ""


# --------------------------------------------------------------- the undo journal's bytes (pure)

def test_undo_plan_of_an_empty_or_headerless_journal_restores_nothing() -> None:
    assert journal.plan_undo(b"") == journal.UndoPlan(None, ())
    assert journal.plan_undo(journal.encode_header(100)[:-1]).committed_size is None  # a commit cut short
    broken = bytearray(journal.encode_header(100))
    broken[5] ^= 1
    assert journal.plan_undo(bytes(broken)).committed_size is None  # a header that does not check out
    plan = journal.plan_undo(journal.encode_header(4096))
    assert plan == journal.UndoPlan(4096, ()) and plan.restored_bytes == 0


def test_undo_plan_applies_records_last_first_so_the_committed_bytes_win() -> None:
    """A region overwritten twice since the commit: its first before-image (the committed bytes) is restored last."""
    header = journal.encode_header(1000)
    seed = journal.record_seed(header)
    content = (header + journal.encode_record(10, b"AAAA", seed) + journal.encode_record(12, b"bbbb", seed)
               + journal.encode_record(10, b"cc", seed))
    plan = journal.plan_undo(content)
    assert plan.committed_size == 1000 and plan.torn == 0
    assert [(r.offset, r.data) for r in plan.restores] == [(10, b"cc"), (12, b"bbbb"), (10, b"AAAA")]
    image = bytearray(b"." * 20)
    for restore in plan.restores:
        image[restore.offset:restore.offset + len(restore.data)] = restore.data
    assert bytes(image[10:16]) == b"AAAAbb"


@pytest.mark.parametrize("cut", [1, 5, journal.RECORD_HEADER_SIZE, journal.RECORD_HEADER_SIZE + 3])
def test_undo_plan_ignores_a_torn_last_record(cut: int) -> None:
    """Killed while a record was appended: its write never happened; the records before it count."""
    header = journal.encode_header(50)
    whole = header + journal.encode_record(0, b"0123456789", journal.record_seed(header))
    last = journal.encode_record(20, b"abcdefgh", journal.record_seed(header))
    plan = journal.plan_undo(whole + last[:cut])
    assert [(r.offset, r.data) for r in plan.restores] == [(0, b"0123456789")] and plan.torn == cut
    damaged = bytearray(whole + last)
    damaged[-1] ^= 0xFF  # whole length, wrong bytes: the same
    assert journal.plan_undo(bytes(damaged)).restores == plan.restores


def test_undo_plan_ignores_the_records_of_an_older_commit() -> None:
    """The journal is reused (never cut while written): a commit's header makes the older records after it count no more."""
    older = journal.encode_header(500, generation=1)
    newer = journal.encode_header(700, generation=2)
    old_record = journal.encode_record(30, b"old!", journal.record_seed(older))
    plan = journal.plan_undo(newer + journal.encode_record(5, b"new", journal.record_seed(newer)) + old_record)
    assert plan.committed_size == 700 and plan.torn == len(old_record)
    assert [(r.offset, r.data) for r in plan.restores] == [(5, b"new")]
    assert journal.plan_undo(newer + old_record).restores == ()  # the commit's header over an older journal


@pytest.mark.parametrize("core", ["compiled", "python"])
def test_undoing_the_journal_after_any_reads_and_writes_gives_the_committed_file_back(tmp_path: Path, core: str) -> None:
    """Both cores of JournaledFile, three commits into one journal (reused, never cut), reads and writes at random
    (over committed bytes, across the committed end, past it): undone, the file is the committed one byte for byte.
    Regions HDF5 read since the commit take their before-image from that read, the others a pread."""
    import random

    if core not in journaled.IMPLEMENTATIONS:
        pytest.skip(f"the compiled journaled I/O is not built: {journaled.FALLBACK_REASON}")
    rng = random.Random(2026)
    path = tmp_path / "file"
    path.write_bytes(b"")
    io = journaled.IMPLEMENTATIONS[core](os.open(path, os.O_RDWR))
    io.set_journal(os.open(tmp_path / "journal", os.O_RDWR | os.O_CREAT))
    io.seek(0)
    io.write(memoryview(rng.randbytes(6000)))
    io.commit()
    from_reads = 0
    for _ in range(3):
        committed = path.read_bytes()
        reads_before = io.before_images_read
        read: list[tuple[int, int]] = []
        for _ in range(300):
            offset, length = rng.randrange(0, len(committed) + 1500), rng.randrange(1, 900)
            if read and rng.random() < 0.3:  # as HDF5 does with metadata: read, changed, written back
                offset, length = rng.choice(read)
                length = rng.randrange(1, length + 1)
            io.seek(offset)
            if rng.random() < 0.4:
                buffer = bytearray(length)
                assert io.readinto(memoryview(buffer)) == length
                assert buffer == (path.read_bytes() + bytes(length + offset))[offset:offset + length]
                read.append((offset, length))
            else:
                assert io.write(memoryview(rng.randbytes(length))) == length
        records = len(journal.plan_undo(os.pread(io.journal_fd, io.journal_room, 0)).restores)
        from_reads += records - (io.before_images_read - reads_before)
        copy = tmp_path / "copy"
        shutil.copyfile(path, copy)
        copy_fd = os.open(copy, os.O_RDWR)
        try:
            journaled.undo(copy_fd, io.journal_fd)
        finally:
            os.close(copy_fd)
        assert copy.read_bytes() == committed
        io.commit()
    assert from_reads > 20  # the read images were used
    io.end_journal()
    io.close()


@pytest.mark.parametrize("core", ["compiled", "python"])
def test_a_journal_without_room_fails_the_write_it_protects_before_it_happens(tmp_path: Path, core: str) -> None:
    """No room for a record (a full disk at the journal's allocation): ENOSPC, as a full disk is recognised
    (h5.file.is_disk_full), and the committed bytes are still in the file."""
    if core not in journaled.IMPLEMENTATIONS:
        pytest.skip(f"the compiled journaled I/O is not built: {journaled.FALLBACK_REASON}")
    path = tmp_path / "file"
    path.write_bytes(b"")
    io = journaled.IMPLEMENTATIONS[core](os.open(path, os.O_RDWR))
    io.set_journal(os.open(tmp_path / "journal", os.O_RDWR | os.O_CREAT))
    io.write(memoryview(b"committed" * 20_000))
    io.commit()

    def no_room(needed: int) -> None:
        raise OSError(28, os.strerror(28))

    io._room = no_room
    io.seek(0)  # a record of these bytes does not fit in the room the commit took
    with pytest.raises(OSError) as raised:
        io.write(memoryview(b"X" * (io.journal_room + 1)))
    assert raised.value.errno == 28 and h5_file.is_disk_full(raised.value)
    assert path.read_bytes() == b"committed" * 20_000
    io.end_journal()
    io.close()


@pytest.mark.parametrize("core", ["compiled", "python"])
def test_a_write_that_finds_no_room_asks_its_owner_for_room_then_writes(tmp_path: Path, core: str) -> None:
    """A full disk (a real tmpfs): the write calls ``on_full``; room made, it is written whole; no room
    made, ENOSPC (never a short, silent write). The owner is H5File, whose spare reserve it gives."""
    if core not in journaled.IMPLEMENTATIONS:
        pytest.skip(f"the compiled journaled I/O is not built: {journaled.FALLBACK_REASON}")
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        filler = os.open(disk / "filler", os.O_RDWR | os.O_CREAT)
        with contextlib.suppress(OSError):  # take every block there is
            for offset in range(0, 1 << 20, 4096):
                os.pwrite(filler, b"f" * 4096, offset)
        io = journaled.IMPLEMENTATIONS[core](os.open(disk / "file", os.O_RDWR | os.O_CREAT))
        asked = []
        io.on_full = lambda: asked.append("no") and False
        with pytest.raises(OSError) as raised:
            io.write(memoryview(b"D" * 64 * 1024))
        assert raised.value.errno == errno.ENOSPC and asked == ["no"]

        def make_room() -> bool:
            asked.append("yes")
            os.ftruncate(filler, 0)
            return True

        io.on_full = make_room
        io.seek(0)
        assert io.write(memoryview(b"D" * 64 * 1024)) == 64 * 1024
        assert asked == ["no", "yes"] and (disk / "file").read_bytes() == b"D" * 64 * 1024
        io.close()
        os.close(filler)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_journal_names_are_hidden_beside_the_file_and_fit_a_file_name() -> None:
    assert journal.journal_name("run_001.h5") == ".run_001.h5.journal"
    long_a, long_b = "a" * 250 + "1.h5", "a" * 250 + "2.h5"
    assert len(journal.journal_name(long_a).encode()) <= 255
    assert journal.journal_name(long_a) != journal.journal_name(long_b)


# ------------------------------------------- truncate (a stop that came late)

_CAM = channel("CAM", "uint16", (80, 96), compression="bitshuffle_lz4")  # 15 KiB: a direct chunk column
_FLOAT_SPECS = [channel("X"), channel("S", "string"), _CAM]
_INT_SPECS = [channel("X", "int32"), channel("S", "string"), _CAM]  # X retyped: /data/X/data(1) at close


def _late_stop_messages() -> list[Message]:
    """Six rows touching every column kind, a variant group, absent values, and a channel new in row 5."""
    rows = [(_FLOAT_SPECS, [1.5, "a", _image(10)]),
            (_INT_SPECS, [2, "b", _image(11)]),
            (_FLOAT_SPECS, [3.5, None, _image(12)]),
            (_FLOAT_SPECS, [4.5, "d", _image(13)]),
            (_INT_SPECS, [5, "e", None]),
            (_FLOAT_SPECS + [channel("NEW")], [6.5, "f", _image(15), 6.0])]
    return [message(10 + row, specs, values) for row, (specs, values) in enumerate(rows)]


def _assert_same_rows(path: Path, reference: Path) -> None:
    """``path`` holds exactly the rows of ``reference``; groups only in ``path`` are all absent."""
    with read(path) as f, read(reference) as g:
        assert f.attrs["number_of_messages"] == g.attrs["number_of_messages"]
        for key in ("first_pulse_id", "last_pulse_id", "first_timestamp", "last_timestamp", "absent_values"):
            assert f.attrs[key] == g.attrs[key], key
        for name in f["data"]:
            for dataset in ("data", "pulse_id", "is_data_present", "timestamp"):
                actual = f[f"data/{name}/{dataset}"][()]
                assert len(actual) == g.attrs["number_of_messages"], (name, dataset)
                if name in g["data"]:
                    np.testing.assert_array_equal(actual, g[f"data/{name}/{dataset}"][()], err_msg=name)
                elif dataset == "is_data_present":
                    assert not actual.any(), name


@pytest.mark.parametrize("flushed", [0, 3, 6], ids=["unflushed", "partly_flushed", "flushed"])
def test_truncate_removes_the_rows_after_a_late_stop(tmp_path: Path, flushed: int) -> None:
    messages = _late_stop_messages()
    keep = 3
    reference = tmp_path / "reference.h5"
    with H5File(reference) as h5:
        for m in messages[:keep]:
            h5.append(m)
        expected_counts = (h5.rows, h5.absent_values, h5.bytes_written)
    now = [0.0]
    h5 = H5File(tmp_path / "cut.h5", block_rows=1000, clock=lambda: now[0])  # flushes only when told
    h5.record_missing(20, 29, "source_silent")  # on disk (/missing) at the first flush below
    for row, m in enumerate(messages):
        if row == flushed:
            h5.flush()
        h5.append(m)
    if flushed == len(messages):
        h5.flush()
    assert h5.rows_flushed == flushed
    clipped = [MissingRange(20, 25, 6, "source_silent")]
    assert h5.truncate(keep, clipped) == 3
    assert (h5.rows, h5.absent_values, h5.bytes_written) == expected_counts
    assert (h5.first_pulse_id, h5.last_pulse_id, h5.last_timestamp) == (10, 12, messages[2].timestamp)
    assert h5.rows_flushed == keep and h5.missing == clipped and h5.missing_pulses == 6
    with read(h5.path) as f:  # on disk at once, before the close
        assert f.attrs["number_of_messages"] == keep and f["data/X/data"].shape == (keep, 1)
    h5.close()
    _assert_same_rows(tmp_path / "cut.h5", reference)
    with read(tmp_path / "cut.h5") as f:
        assert f.attrs["rows_removed_after_stop"] == 3 and f.attrs["complete"] == 1
        assert f["missing"][()].tolist() == [(20, 25, 6, b"source_silent")] and f.attrs["missing_pulses"] == 6
        assert f["data/CAM"].attrs["storage"] == "bitshuffle_lz4 direct chunk"
        assert list(f["data/X/data_variant"][()]) == [0, 1, 0] and f["data/X/data(1)"][()].tolist() == [[0], [2]]
        assert list(f["data/X/pulse_id"][()]) == [10, 11, 12]
        for row in range(keep):
            np.testing.assert_array_equal(f["data/CAM/data"][row], _image(10 + row))


def test_truncate_to_nothing_and_appending_after_it(tmp_path: Path) -> None:
    messages = _late_stop_messages()
    h5 = H5File(tmp_path / "empty.h5")
    for m in messages[:2]:
        h5.append(m)
    h5.flush()
    h5.record_missing(12, 12, "pulse_id_jump")
    assert h5.truncate(0, missing=[]) == 2
    assert (h5.rows, h5.first_pulse_id, h5.absent_values, h5.bytes_written, h5.missing) == (0, None, 0, 0, [])
    with read(h5.path) as f:
        assert f.attrs["number_of_messages"] == 0 and "last_pulse_id" not in f.attrs and "missing" not in f
    h5.append(messages[3])  # the file goes on from the cut
    assert h5.truncate(1) == 0  # nothing to remove: no attribute change, missing kept
    h5.close()
    with read(h5.path) as f:
        assert f.attrs["number_of_messages"] == 1 and f.attrs["rows_removed_after_stop"] == 2
        assert list(f["data/X/pulse_id"][()]) == [13] and f["data/X/data"][0, 0] == 4.5
    with pytest.raises(ValueError):
        H5File(tmp_path / "more.h5").truncate(1)


# ------------------------------------------------------- file attributes


def _documented_file_attributes() -> list[str]:
    """The attribute names of the table "File attributes" in docs/file-format.md, in order."""
    text = (ROOT / "docs" / "file-format.md").read_text()
    section = text.split("## File attributes", 1)[1].split("\n## ", 1)[0]
    return [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]


def test_the_documented_file_attributes_are_the_ones_in_the_code() -> None:
    assert _documented_file_attributes() == list(layout.FILE_ATTRIBUTES)


def test_only_documented_attributes_can_be_set(tmp_path: Path) -> None:
    with H5File(tmp_path / "attrs.h5") as h5:
        with pytest.raises(ValueError, match="start_pulse_id"):
            h5.set_attributes({"start_pulse_id": 1})
        with pytest.raises(ValueError, match="number_of_messages"):
            h5.set_attributes({"number_of_messages": 1})  # the file's own


# ------------------------------------------- channel names are data

HOSTILE_NAMES = {  # channel name -> its group under /data (docs/file-format.md, "Channel names")
    "X:A": "X:A",
    "X:A/pulse_id": "X:A%2Fpulse_id",  # was: a group under the dataset X:A/pulse_id
    "/general": "%2Fgeneral",  # was: the file's own /general
    "a/b/c": "a%2Fb%2Fc",
    ".": "%2E",
    "..": "%2E%2E",
    "..x": "..x",
    "A\x00B": "A%00B",
    "tab\there": "tab%09here",
    "S\ud800": "S%ED%A0%80",  # a lone surrogate: not text, kept by its bytes
    "100%": "100%25",
    "X@2": "X%402",  # never taken for the variant group of a channel X
    "Ω-ü": "Ω-ü",
}


def test_every_channel_name_maps_to_a_documented_group_and_the_close_is_not_affected(tmp_path: Path) -> None:
    path = tmp_path / "names.h5"
    channels = [channel(name) for name in HOSTILE_NAMES]
    with H5File(path, {"general/user": "names"}) as h5:
        for pulse_id in range(1, 4):
            h5.append(message(pulse_id, channels, [pulse_id + i for i in range(len(channels))]))
        h5.append(message(4, [channel("X:A", "int32")], [7]))  # X:A retyped: a variant beside it
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"] == 1 and f.attrs["number_of_messages"] == 4
        assert f["general/user"][()] == b"names"  # untouched by "/general"
        assert "refused_channels" not in f.attrs
        for index, (name, group_name) in enumerate(HOSTILE_NAMES.items()):
            group = f["data"][group_name]
            assert group.attrs["name"] == layout.storable_text(name)
            first_type = group["data(1)" if name == "X:A" else "data"]  # X:A: the newer type is in data
            np.testing.assert_array_equal(first_type[:3, 0], [1 + index, 2 + index, 3 + index])
            assert layout.channel_of_group(group_name) == name
        assert sorted(f["data"]) == sorted(HOSTILE_NAMES.values())
        assert f["data/X:A/data"].dtype == np.dtype("<i4") and f["data/X:A/data(1)"].shape == (3, 1)


def test_a_channel_whose_group_cannot_be_made_is_refused_and_nothing_else_is_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group HDF5 will not make (here: two names made to map to one group) costs that channel only."""
    from sf_bsread_writer.h5 import file as h5_file_module

    monkeypatch.setattr(h5_file_module, "channel_group_name", lambda name: "X" if name == "X2" else name)
    path = tmp_path / "refused.h5"
    with H5File(path) as h5:
        h5.append(message(1, [channel("X"), channel("Y")], [1.0, 2.0]))
        h5.append(message(2, [channel("X"), channel("X2"), channel("Y")], [3.0, 5.0, 4.0]))
    assert h5.refused_channels == {"X2": "its group /data/X is already taken"}
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"] == 1 and f.attrs["number_of_messages"] == 2
        np.testing.assert_array_equal(f["data/Y/data"][:, 0], [2.0, 4.0])
        np.testing.assert_array_equal(f["data/X/data"][:, 0], [1.0, 3.0])
        assert json.loads(f.attrs["refused_channels"]) == [
            {"channel": "X2", "reason": "its group /data/X is already taken"}]


# ------------------------------------------- absent values cost no memory of their shape

def test_absent_values_cost_no_memory_of_their_shape(tmp_path: Path) -> None:
    """A 4 MiB channel absent in 59 of 60 pending rows: was 240 MB of zeros in memory, now ~the one value."""
    import tracemalloc

    big = channel("BIG", "uint8", (2048, 2048))  # 4 MiB per value, uncompressed
    image = (np.arange(2048 * 2048) % 251).astype("u1").reshape(2048, 2048)
    messages = [message(p, [channel("X"), big], [float(p), image if p == 30 else None]) for p in range(1, 61)]
    path = tmp_path / "absent.h5"
    tracemalloc.start()
    try:
        with H5File(path, flush_interval=1e9, block_rows=1000) as h5:
            for item in messages:
                h5.append(item)
            held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 16 * 2**20, f"{held / 2**20:.0f} MiB held for one present 4 MiB value"
    with h5py.File(path, "r") as f:
        present = f["data/BIG/is_data_present"][()]
        assert present.tolist() == [int(p == 30) for p in range(1, 61)]
        np.testing.assert_array_equal(f["data/BIG/data"][29], image)
        assert not f["data/BIG/data"][28].any() and not f["data/BIG/data"][59].any()
        np.testing.assert_array_equal(f["data/X/data"][:, 0], np.arange(1, 61, dtype=float))


def test_absent_rows_between_present_ones_read_back_in_place(tmp_path: Path) -> None:
    """Sparse present rows of array channels, small (one write per block) and large (one write per run)."""
    small = channel("W", "int32", (16,))
    large = channel("L", "uint16", (300, 300))  # 180 kB rows: written by runs of present rows
    pattern = [1, 0, 0, 1, 1, 0, 1, 1, 1, 0]
    path = tmp_path / "runs.h5"
    with H5File(path, block_rows=7) as h5:  # blocks cut the runs
        for p, on in enumerate(pattern * 2):
            h5.append(message(p, [small, large], [np.full(16, p, "i4") if on else None,
                                                  np.full((300, 300), p, "u2") if on else None]))
    with h5py.File(path, "r") as f:
        for name in ("W", "L"):
            data, present = f[f"data/{name}/data"][()], f[f"data/{name}/is_data_present"][()]
            assert present.tolist() == pattern * 2
            for p, on in enumerate(pattern * 2):
                assert (data[p] == (p if on else 0)).all(), (name, p)


# --------------------------------------------------------------------- packed messages


def _stream_frames(n_messages: int) -> list[list[bytes]]:
    """Raw messages of a mixed stream with every irregularity the packed gather must handle."""
    channels = [channel(f"S{i}", type) for i, type in enumerate(NUMERIC_TYPES)]
    channels += [channel("BIG", "int32", encoding="big"), channel("WF", "float32", shape=(7,)),
                 channel("STR", "string"), channel("EVERY3", "float64"), channel("IMG", "uint16", shape=(300, 200))]
    result = []
    for pulse_id in range(100, 100 + n_messages):
        values = [value_for(spec["type"], pulse_id, spec["shape"]) for spec in channels]
        values[channels.index(channel("EVERY3", "float64"))] = None if pulse_id % 3 else 0.5 * pulse_id
        frames = build_message(pulse_id, channels, values, timestamp=1_700_000_000 + pulse_id / 100)
        if pulse_id % 5 == 0:
            frames[3 + 2 * 3] = b""  # a value without its timestamp
        if pulse_id % 7 == 0:
            frames[2 + 2 * 10] = frames[2 + 2 * 10][:4]  # a float64 of 4 bytes: the message goes channel by channel
        result.append(frames)
    return result


def _datasets(path: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    with read(path) as h5:
        h5.visititems(lambda name, item: found.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
        found["attrs"] = {k: v for k, v in h5.attrs.items() if k not in ("created", "closed")}
    return found


def test_a_packed_message_is_written_exactly_as_its_frames(tmp_path: Path) -> None:
    """The compiled receiver's packed form and a list of frames give the same file, irregularities included."""
    from sf_bsread_writer.bsread.parts import LayoutCache, pack

    stream = _stream_frames(60)
    layouts = LayoutCache()
    header = None
    for path, packed in ((tmp_path / "frames.h5", False), (tmp_path / "packed.h5", True)):
        with H5File(path, block_rows=16) as h5:
            for frames in stream:
                if packed:
                    parts = pack(frames, layouts, header)
                    header = parts.header
                    h5.append(_PARSER.parse(parts))
                else:
                    h5.append(_PARSER.parse(frames))
    plain, packed = _datasets(tmp_path / "frames.h5"), _datasets(tmp_path / "packed.h5")
    assert plain.keys() == packed.keys()
    for name in plain:
        if name == "attrs":
            assert {k: str(v) for k, v in plain[name].items()} == {k: str(v) for k, v in packed[name].items()}
        else:
            np.testing.assert_array_equal(plain[name], packed[name], err_msg=name)
    assert plain["data/EVERY3/is_data_present"].sum() == 20  # the modulo channel: present every third pulse
    assert packed["attrs"]["absent_values"] > 0


@pytest.mark.parametrize("dtype", ["float64", "float32", "int16", "uint8", "mixed"])
def test_a_packed_scalar_stream_is_copied_bit_for_bit(tmp_path: Path, dtype: str) -> None:
    """Values and timestamps of any bits (NaN payloads, implausible stamps) reach the file as sent, packed or not.

    A stream whose packed channels all have one size, one after the other, is
    gathered with two strided copies (``LayoutGather.regular``, issue 24);
    others (mixed sizes) with numpy takes. Either way: the bytes sent.
    """
    from sf_bsread_writer.bsread.parts import LayoutCache, pack

    types = ["float64", "float32", "int16", "uint8"] * 3 if dtype == "mixed" else [dtype] * 12
    channels = [channel(f"C{i}", kind) for i, kind in enumerate(types)]
    rng = np.random.default_rng(24)
    stream = []
    for pulse_id in range(1, 41):
        frames = build_message(pulse_id, channels, [0] * len(channels), timestamp=1_700_000_000 + pulse_id / 100)
        for i, kind in enumerate(types):
            frames[2 + 2 * i] = rng.bytes(np.dtype(kind).itemsize)
            if pulse_id % 3 == 0:  # stamps of any bits: a quiet NaN's, all ones, random
                frames[3 + 2 * i] = (b"\xff" * 16, bytes.fromhex("7ff8000000000001") * 2, rng.bytes(16))[i % 3]
        stream.append(frames)
    layouts = LayoutCache()
    header = None
    regular = []
    for path, packed in ((tmp_path / "frames.h5", False), (tmp_path / "packed.h5", True)):
        with H5File(path, block_rows=16) as h5:
            for frames in stream:
                if packed:
                    parts = pack(frames, layouts, header)
                    header = parts.header
                    h5.append(_PARSER.parse(parts))
                    regular.append(h5._plan.gather_for(parts.layout).regular is not None)
                else:
                    h5.append(_PARSER.parse(frames))
    plain, packed = _datasets(tmp_path / "frames.h5"), _datasets(tmp_path / "packed.h5")
    assert plain.keys() == packed.keys()
    for name in plain:
        if name != "attrs":
            assert plain[name].tobytes() == packed[name].tobytes(), name
    for i, kind in enumerate(types):
        sent = b"".join(frames[2 + 2 * i] for frames in stream)
        assert packed[f"data/C{i}/data"].tobytes() == sent
    assert all(regular) is (dtype != "mixed")


def test_an_append_that_fails_half_way_leaves_no_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All or nothing per row: a failure after some channels took their value shifts no later row."""
    specs = [channel("A", "float64"), channel("S", "string")]
    path = tmp_path / "fail.h5"
    original = columns.StringColumn.append if hasattr(columns, "StringColumn") else None
    failing = {"armed": False}
    string_column = None
    with H5File(path, block_rows=4) as h5:
        h5.append(message(1, specs, [1.0, "one"]))
        for column in h5._each_column():
            if type(column) is not columns.FixedColumn:
                string_column = type(column)
        assert string_column is not None
        original = string_column.append

        def append(self, *args, **kwargs):
            if failing["armed"]:
                raise RuntimeError("injected")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(string_column, "append", append)
        failing["armed"] = True
        with pytest.raises(RuntimeError):
            h5.append(message(2, specs, [2.0, "two"]))
        failing["armed"] = False
        h5.append(message(3, specs, [3.0, "three"]))
    with read(path) as h5:
        assert list(h5["data/A/pulse_id"][()]) == [1, 3]
        assert list(h5["data/A/data"][()].ravel()) == [1.0, 3.0]
        assert [v.decode() if isinstance(v, bytes) else v for v in h5["data/S/data"][()].ravel()] == ["one", "three"]
        assert h5.attrs["number_of_messages"] == 2


def test_low_level_creation_makes_what_the_high_level_api_makes(tmp_path: Path) -> None:
    """Datasets and attributes made with the low-level API (fast, per channel) match h5py's own, type for type."""
    specs = [channel("A", "float64"), channel("B", "uint16", shape=(3,)), channel("C", "float64")]
    path = tmp_path / "made.h5"
    with H5File(path, block_rows=2) as h5:
        h5.append(message(1, specs, [value_for(s["type"], 1, s["shape"]) for s in specs]))
    with h5py.File(path, "a") as f:
        reference = f.create_group("reference")
        expected = {"name": "C", "type": "float64", "shape": np.array([1], dtype="<i8"), "encoding": "little",
                    "compression": "none", "modulo": 1, "offset": 0, "storage": "buffered"}
        for key, value in expected.items():
            reference.attrs[key] = value  # the high-level way
        made = f["data/C"]
        assert set(made.attrs) == set(expected)
        for key in expected:
            assert made.attrs.get_id(key).get_type() == reference.attrs.get_id(key).get_type(), key
            np.testing.assert_array_equal(made.attrs[key], reference.attrs[key])
        for name in ("data", "pulse_id", "is_data_present", "timestamp"):
            high = f.create_dataset(f"reference/{name}", shape=(0,) + made[name].shape[1:],
                                    maxshape=(None,) + made[name].shape[1:], dtype=made[name].dtype,
                                    chunks=made[name].chunks, fillvalue=np.zeros((), made[name].dtype))
            low = made[name]
            assert (low.dtype, low.chunks, low.maxshape, low.fillvalue) == (
                high.dtype, high.chunks, high.maxshape, high.fillvalue), name
            low_plist, high_plist = low.id.get_create_plist(), high.id.get_create_plist()
            for getter in ("get_chunk", "get_layout", "get_fill_time", "get_alloc_time", "get_nfilters"):
                assert getattr(low_plist, getter)() == getattr(high_plist, getter)(), (name, getter)
            assert h5py.h5o.get_info(low.id).ctime == 0, name  # no object times: reproducible files, as h5py
        assert f["data/C/timestamp"].attrs["units"].startswith("ns since 1970")
        assert f["data/B/data"].shape == (1, 3) and f["data/B/data"].chunks == f["data/B/data"].chunks


def test_a_group_is_sized_by_a_value_that_decodes_never_by_a_claim(tmp_path: Path) -> None:
    """A bitshuffle channel declaring 2 GiB per value whose parts never decode gets no group (was: a
    (n, 2147483648) dataset, outcome complete, absent_values 0); one whose first value is broken gets its
    group at its first good value; every refused value is absent and counted by channel and reason."""
    path = tmp_path / "claims.h5"
    claim = channel("CLAIM", "uint8", (2 ** 31,), compression="bitshuffle_lz4")
    late = channel("LATE", "int32", (4,))
    good = channel("GOOD", "float64")
    with H5File(path) as h5:
        for pulse_id in range(1, 5):
            frames = build_message(pulse_id, [channel("CLAIM", "uint8"), late, good],
                                            [1, np.arange(4) + pulse_id, pulse_id / 2], timestamp=float(pulse_id))
            header = json.loads(frames[1])
            header["channels"][0] = claim
            frames[1] = json.dumps(header).encode()
            main = json.loads(frames[0])
            frames[0] = json.dumps({**main, "hash": "claims"}).encode()
            frames[2] = struct.pack(">QI", 2 ** 31, 8192) + b"\x00" * 20
            if pulse_id == 1:
                frames[4] = b"\x01"  # LATE: 1 byte for an int32 [4]
            h5.append(_PARSER.parse(frames))
        h5.settle_channels()
        assert h5.refused_values == {"CLAIM": {"value_invalid": 4}, "LATE": {"value_invalid": 1}}
        assert set(h5.refused_channels) == {"CLAIM", "LATE"}
    with read(path) as f:
        assert set(f["data"]) == {"LATE", "GOOD"}
        assert f["data/LATE/data"].shape == (4, 4)
        assert f["data/LATE/is_data_present"][:].tolist() == [0, 1, 1, 1]
        assert f["data/GOOD/data"][:, 0].tolist() == [0.5, 1.0, 1.5, 2.0]
        assert f.attrs["absent_values"] == 5
        refused = json.loads(f.attrs["refused_channels"])
        assert {(r["channel"], r["reason"], r["values"]) for r in refused} == {("CLAIM", "value_invalid", 4),
                                                                              ("LATE", "value_invalid", 1)}


def test_a_process_that_ends_with_its_file_open_exits_cleanly_and_leaves_the_last_flush(tmp_path: Path) -> None:
    """HDF5 closes files left open from its own exit handler, after Python: through the journaled file object
    that was a segmentation fault (exit -11) and a journal left for the guardian. Now the file goes back to its
    last flush while Python runs, the process exits 0, and no journal stays."""
    path = tmp_path / "left-open.h5"
    script = textwrap.dedent("""
        import sys
        import numpy as np
        from sf_bsread_writer.h5.file import H5File
        from sf_bsread_writer.bsread.build import build_message
        from sf_bsread_writer.bsread.message import MessageParser
        channels = [{"name": "X", "type": "float64", "shape": [1]}]
        h5 = H5File(sys.argv[1], {"general/user": "left-open"}, flush_interval=1e9)
        parser = MessageParser()
        for pulse_id in range(10):
            h5.append(parser.parse(build_message(pulse_id, channels, [np.float64(pulse_id)])))
        h5.flush()
        for pulse_id in range(10, 15):  # appended, never flushed: not in the file
            h5.append(parser.parse(build_message(pulse_id, channels, [np.float64(pulse_id)])))
        print("leaving", flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(path)], env=_child_env(), timeout=60,
                            capture_output=True, text=True)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "the file was left open; the file is back at its last flush" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no journal beside it
    with h5py.File(path, "r") as f:
        assert int(f.attrs["number_of_messages"]) == 10 and f.attrs["complete"] == 0
        assert f["data/X/data"][:].ravel().tolist() == [float(i) for i in range(10)]


def test_the_full_disk_checks_journal_bound_holds_every_flush_and_is_not_far_above_it(tmp_path: Path) -> None:
    """``Column.rewritten_bytes`` is what the full-disk check keeps free for the undo journal: never below what a
    flush journals (a flush would run out of room), and not ~18 times above it (62 KiB against 3.4 KiB per
    scalar channel before: with 12 000 channels the writer stopped ~700 MB before the disk was full). Blocks
    inside a chunk and blocks that start or cross one (index nodes change) are both in the run."""
    from sf_bsread_writer.tools.simulate import channel_metadata, expected_values

    n = 20
    channels = channel_metadata("scalars", n_channels=n)
    parser = MessageParser()
    h5 = H5File(tmp_path / "bound.h5", block_rows=100_000, flush_interval=1e9)
    ratios = []
    for pulse_id in range(1, 2301):
        values = expected_values("scalars", pulse_id, n)
        h5.append(parser.parse(build_message(pulse_id, channels, [values[c["name"]] for c in channels],
                                             timestamp=1.7e9 + pulse_id / 100)))
        if pulse_id % 100 == 0:
            start = h5.rows_flushed
            committed = start > 0  # the first flush rewrites nothing committed of the channels' groups
            bound = sum(column.rewritten_bytes(start, h5.rows - start) for column in h5._each_column())
            h5.flush()
            journaled = h5._io.journal_bytes_at_commit - journal.HEADER_SIZE
            if committed:
                assert journaled <= bound, (pulse_id, journaled, bound)
                ratios.append(bound / journaled)
    h5.close()
    assert max(ratios) <= 6, ratios
